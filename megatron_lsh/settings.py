"""Declaring and checking settings: the building blocks of :mod:`megatron_lsh.config`.

:func:`setting` declares a dataclass field together with its command-line flag and help;
the ``check_*`` / :func:`require` helpers raise :class:`ConfigError` with one sentence that
names the setting by its flag; :func:`replace_config` re-derives derived defaults. Kept apart
from the config classes so that those read as a list of settings.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Optional


class ConfigError(ValueError):
    """An invalid setting; the message is one sentence naming the setting(s) and value(s)."""


def setting(default: Any = dataclasses.MISSING, flag: Optional[str] = None, help: str = "", *,
            default_factory: Any = dataclasses.MISSING, choices=None, const: Any = None,
            metavar: Optional[str] = None, nargs: Optional[str] = None,
            show_default: bool = True, aliases: Optional[dict] = None,
            flag_aliases: tuple = (), parse: Any = None) -> Any:
    """A dataclass field with its command-line flag.

    ``const`` makes the flag take no value and store ``const`` (``--swiglu`` stores
    ``"swiglu"`` in ``activation``); a bool field's flag stores ``not default``
    (``--sequence-parallel`` sets ``sequence_parallel``). ``choices`` is checked on the
    command line and in ``__post_init__`` (with :func:`check_choice`). ``aliases`` maps
    further value-less flags to the value they store (``{"--moe-lsh-no-compensation":
    "none"}``). ``flag_aliases`` are further names of the same flag, taking the same value
    (``--layernorm-epsilon`` for ``--norm-epsilon``). ``parse`` converts the flag's text
    (instead of the field's type), raising ``ValueError`` with the reason.
    """
    metadata = {"flag": flag, "help": help, "choices": choices, "const": const,
                "metavar": metavar, "nargs": nargs, "show_default": show_default,
                "aliases": aliases or {}, "flag_aliases": tuple(flag_aliases), "parse": parse}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def setting_name(obj_or_cls: Any, name: str) -> str:
    """How messages name a field: its flag, or ``Class.field`` when it has none."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("flag") or f"{cls.__name__}.{name}"
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def require(cond: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond``."""
    if not cond:
        raise ConfigError(message)


def check_positive(obj: Any, *names: str) -> None:
    """Each named field is > 0."""
    for name in names:
        value = getattr(obj, name)
        require(value is not None and value > 0,
                f"{setting_name(obj, name)} must be positive, got {value}")


def check_non_negative(obj: Any, *names: str) -> None:
    """Each named field is >= 0."""
    for name in names:
        value = getattr(obj, name)
        require(value is not None and value >= 0,
                f"{setting_name(obj, name)} must be non-negative, got {value}")


def check_probability(obj: Any, *names: str) -> None:
    """Each named field is in [0, 1)."""
    for name in names:
        value = getattr(obj, name)
        require(0.0 <= value < 1.0, f"{setting_name(obj, name)} must be in [0, 1), got {value}")


def check_choice(obj: Any, name: str, choices=None) -> None:
    """The field is one of ``choices`` (default: the choices its :func:`setting` declares)."""
    if choices is None:
        choices = next(f.metadata["choices"] for f in dataclasses.fields(obj) if f.name == name)
    value = getattr(obj, name)
    require(value in choices, f"{setting_name(obj, name)} must be one of "
                              f"{sorted(map(repr, choices))}, got {value!r}")


def _derive(obj: Any, name: str, value: Any) -> None:
    """Fill a derived default and remember it, so :func:`replace_config` can re-derive it."""
    if getattr(obj, name) is None:
        setattr(obj, name, value)
        obj.__dict__.setdefault("_derived", set()).add(name)


def replace_config(config: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that re-derives derived defaults (e.g. ``ffn_hidden_size``)
    unless they are among ``changes``; the result is checked again."""
    for name in config.__dict__.get("_derived", ()):
        changes.setdefault(name, None)
    return dataclasses.replace(config, **changes)


def parse_moe_layer_freq(text: str):
    """``--moe-layer-freq``'s text -> an int or a 0/1 list, as Megatron reads it.

    Accepts an int (``"2"``) or a Python list expression built from int lists with ``+`` and
    ``*`` (``"[1,0,1,0]"``, ``"([0]*3+[1]*1)*3"``); nothing else is evaluated.
    """
    import ast

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported element {ast.dump(node)[:40]}")

    text = str(text).strip().strip("'\"")
    try:
        result = value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, TypeError) as error:
        raise ConfigError(f"--moe-layer-freq must be an int or a list expression like "
                          f"'([0]*1+[1]*1)*12', got {text!r}") from error
    if isinstance(result, list) and not all(type(v) is int for v in result):
        raise ConfigError(f"--moe-layer-freq must give a flat list of 0 and 1, got {text!r}")
    return result


def parse_layer_list(text) -> tuple:
    """``"1,3"`` / ``"1 3"`` / a list of ints / ``""`` -> sorted unique 1-based layer numbers
    (``()`` when empty); ValueError naming the bad value otherwise."""
    if isinstance(text, str):
        text = text.strip(" ,'\"")
    if not text:
        return ()
    values = parse_int_tuple(text)
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"layer numbers are 1-based, got {bad[0]}")
    return tuple(sorted(set(values)))


def parse_int_tuple(text) -> tuple:
    """``"2,2,6,2"`` (or a list / tuple of ints) -> ``(2, 2, 6, 2)``; ValueError otherwise."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t for t in str(text).replace(" ", ",").split(",") if t]
    try:
        values = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"expected comma-separated integers, got {text!r}")
    return values
