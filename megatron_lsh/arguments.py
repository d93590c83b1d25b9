"""Megatron-compatible command-line flags -> :class:`~megatron_lsh.config.MegatronLSHConfig`.

The flags keep Megatron-LM's names and meanings; they are only the outer skin of the typed
configs, and nothing here lists them: the parser is derived from the config dataclasses
(fields declared with :func:`megatron_lsh.config.setting`) and from the ``Options`` dataclass
of every registered all-to-all compressor. Every flag's parser default is "not given"
(``argparse.SUPPRESS``), so a field that no flag sets keeps its base value: the dataclass
default, or the value of a ``base`` config (a recipe chosen by the entry point).

Precedence, lowest first: dataclass defaults, ``base`` (section configs, e.g. a recipe's
``ModelConfig`` and ``MoEConfig``), the command line. Any invalid value ends in
``parser.error`` with one sentence naming the flag (argparse exits with status 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from megatron_lsh.compat import add_compat_flags, check_compat_flags
from megatron_lsh.config import (SECTIONS, ConfigError, MegatronLSHConfig, MoEConfig,
                                 replace_config)
from megatron_lsh.moe.compressors import compressor_classes
from megatron_lsh.tokenizer import TOKENIZER_TYPES

_GROUP_TITLES = {"model": "model shape", "moe": "mixture of experts", "parallel": "parallelism",
                 "optimizer": "optimizer and learning rate", "training": "training",
                 "data": "data and tokenizer", "checkpoint": "checkpointing",
                 "logging": "logging"}
_DYNAMIC_CHOICES = {("data", "tokenizer_type"): lambda: TOKENIZER_TYPES,
                    ("moe", "a2a_compression"): lambda: list(compressor_classes())}
"""Choices that come from a registry rather than from the field's declaration."""


@dataclasses.dataclass(frozen=True)
class FlagTarget:
    """Where a flag's value goes: ``section`` ('model', ...) or a compressor's options."""

    section: str
    field: str
    compressor: Optional[str] = None


def _value_type(cls: type, f: dataclasses.Field):
    """The scalar type of a field (``Optional[int]`` -> int)."""
    hint = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(hint) is Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _text_parser(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from a field's ``parse``: its error message becomes argparse's."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:   # ConfigError is a ValueError
            raise argparse.ArgumentTypeError(str(error)) from None
    return convert


def _add_field_flag(group, cls: type, f: dataclasses.Field, target: FlagTarget,
                    table: dict, choices=None) -> None:
    """Add the flag a field declares (if any) to ``group`` and record it in ``table``."""
    md = f.metadata
    flag = md.get("flag")
    if not flag:
        return
    dest = flag.lstrip("-").replace("-", "_")
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
    kind = _value_type(cls, f)
    default = f.default if f.default is not dataclasses.MISSING else None
    help_text = md.get("help", "")
    if md.get("const") is not None:
        kwargs.update(action="store_const", const=md["const"])
    elif kind is bool:
        kwargs.update(action="store_const", const=not default)
    else:
        if kind is list:
            kwargs["nargs"] = md.get("nargs") or "+"
        elif md.get("parse") is not None:
            kwargs["type"] = _text_parser(md["parse"])
        else:
            kwargs["type"] = kind
        choices = choices if choices is not None else md.get("choices")
        if choices is not None:
            kwargs["choices"] = [c for c in choices if c is not None]
        if md.get("metavar"):
            kwargs["metavar"] = md["metavar"]
        if md.get("show_default", True) and default is not None:
            help_text = f"{help_text} (default: {default})"
    group.add_argument(flag, *md.get("flag_aliases", ()), help=help_text, **kwargs)
    table[dest] = target
    for alias, value in md.get("aliases", {}).items():
        group.add_argument(alias, dest=dest, default=argparse.SUPPRESS, action="store_const",
                           const=value, help=f"Same as {flag} {value}.")


def build_parser(extra_args_provider: Optional[Callable[[argparse.ArgumentParser],
                                                        argparse.ArgumentParser]] = None
                 ) -> argparse.ArgumentParser:
    """The parser of every Megatron flag this project supports (plus an entry point's own).

    ``extra_args_provider(parser) -> parser`` adds flags the way Megatron entry points do;
    their values come back in the namespace of :func:`parse_args_with_namespace`.
    """
    parser = argparse.ArgumentParser(
        description="Megatron-style MoE pretraining with a compressible expert all-to-all.",
        usage="%(prog)s [flags] (all flags: --help)", allow_abbrev=False)
    parser.set_defaults(_flag_table={})
    table = parser.get_default("_flag_table")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(_GROUP_TITLES[section])
        for f in dataclasses.fields(cls):
            dynamic = _DYNAMIC_CHOICES.get((section, f.name))
            _add_field_flag(group, cls, f, FlagTarget(section, f.name), table,
                            dynamic() if dynamic else None)
    for name, compressor in compressor_classes().items():
        options_cls = compressor.Options
        if not dataclasses.fields(options_cls):
            continue
        group = parser.add_argument_group(f"all-to-all compressor '{name}' "
                                          f"(with --moe-a2a-compression {name})")
        for f in dataclasses.fields(options_cls):
            _add_field_flag(group, options_cls, f, FlagTarget("moe", f.name, name), table)
    add_compat_flags(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


def _flag_of(table: Mapping[str, FlagTarget], target: FlagTarget) -> str:
    dest = next(d for d, t in table.items() if t == target)
    return "--" + dest.replace("_", "-")


def _compression_options(moe: MoEConfig, given: dict, table: dict) -> Any:
    """The selected compressor's options: its flags over the base's (or its defaults)."""
    name = moe.a2a_compression
    classes = compressor_classes()
    if name not in classes:
        raise ConfigError(f"--moe-a2a-compression must be one of {list(classes)}, got {name!r}")
    cls = classes[name].Options
    changes = {}
    for target, value in given.items():
        if target.compressor != name:
            raise ConfigError(f"{_flag_of(table, target)} is an option of the "
                              f"'{target.compressor}' compressor, but --moe-a2a-compression "
                              f"is '{name}'")
        changes[target.field] = value
    base = moe.compression_options if isinstance(moe.compression_options, cls) else None
    if base is None:
        return cls(**changes) if changes else None
    return replace_config(base, **changes)


def config_from_namespace(namespace: argparse.Namespace,
                          base: Optional[Union[MegatronLSHConfig, Mapping[str, Any]]] = None
                          ) -> MegatronLSHConfig:
    """Build the config from parsed flags over ``base`` section configs; raises ConfigError.

    Megatron flags without a setting (:mod:`megatron_lsh.compat`) are checked first: a
    refused one raises; the accepted no-ops given are left in ``namespace.compat_accepted``.
    """
    table: dict[str, FlagTarget] = getattr(namespace, "_flag_table", None) or \
        build_parser().get_default("_flag_table")
    namespace.compat_accepted = check_compat_flags(namespace)
    if isinstance(base, MegatronLSHConfig):
        base = {name: getattr(base, name) for name in SECTIONS}
    base = dict(base or {})
    unknown = sorted(set(base) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"base config has unknown sections: {', '.join(unknown)} "
                          f"(known: {', '.join(SECTIONS)})")
    changes: dict[str, dict] = {name: {} for name in SECTIONS}
    compressor_given: dict[FlagTarget, Any] = {}
    for dest, value in vars(namespace).items():
        target = table.get(dest)
        if target is None:
            continue
        if target.compressor is not None:
            compressor_given[target] = value
        else:
            changes[target.section][target.field] = value
    sections = {}
    for name, cls in SECTIONS.items():
        start = base.get(name)
        sections[name] = (replace_config(start, **changes[name]) if start is not None
                          else cls(**changes[name]))
    moe = sections["moe"]
    sections["moe"] = dataclasses.replace(
        moe, compression_options=_compression_options(moe, compressor_given, table))
    return MegatronLSHConfig(**sections)


def parse_args_with_namespace(argv: Optional[Sequence[str]] = None,
                              base: Optional[Union[MegatronLSHConfig, Mapping[str, Any]]] = None,
                              extra_args_provider: Optional[Callable] = None
                              ) -> tuple[MegatronLSHConfig, argparse.Namespace]:
    """Parse ``argv`` (sys.argv[1:] when None) into a config and the raw namespace.

    The namespace holds only flags given on the command line plus every flag added by
    ``extra_args_provider`` (with its own defaults). ``base`` may be a function of that
    namespace returning the base (raising ConfigError when the flags do not allow one). A bad
    value ends in ``parser.error``.
    """
    parser = build_parser(extra_args_provider)
    namespace = parser.parse_args(argv)
    try:
        if callable(base):   # chosen from the flags given (e.g. a recipe named by one)
            base = base(namespace)
        config = config_from_namespace(namespace, base)
    except ConfigError as error:
        parser.error(str(error))
    del namespace._flag_table
    return config, namespace


def parse_args(argv: Optional[Sequence[str]] = None,
               base: Optional[Union[MegatronLSHConfig, Mapping[str, Any]]] = None, *,
               extra_args_provider: Optional[Callable] = None) -> MegatronLSHConfig:
    """Parse Megatron-style flags into a :class:`MegatronLSHConfig` (see the module docstring)."""
    return parse_args_with_namespace(argv, base, extra_args_provider)[0]
