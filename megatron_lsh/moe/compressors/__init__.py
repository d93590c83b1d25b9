"""All-to-all compressors: one class in one file each, registered by name.

A compressor decides what crosses the expert all-to-all (see :mod:`.base` for the protocol).
Every module in this folder is imported on first use of the registry, and a module registers
its compressor with :func:`register_compressor`; the registry then feeds everything else:

* construction: :func:`build_compressor` (called by the MoE layer),
* the ``--moe-a2a-compression`` choices and the compressor's own flags (``arguments.py``
  derives them from the class's ``Options`` dataclass, declared with
  :func:`megatron_lsh.config.setting`),
* validation: an unknown name or options of the wrong class are refused in one sentence.

Adding a compressor therefore means adding one file here; nothing else changes.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

from megatron_lsh.config import ConfigError, MoEConfig
from megatron_lsh.moe.compressors.base import Compressor, Rows, weighted_sum_into_tokens

_REGISTRY: dict[str, type] = {}
_discovered = False


def register_compressor(cls: type) -> type:
    """Class decorator: make ``cls`` (a :class:`Compressor` with a ``name``) available."""
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        raise TypeError(f"{cls!r} is not a Compressor subclass")
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"compressor {cls.__name__} needs a class attribute name = '...'")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"two compressors are named {name!r}: {_REGISTRY[name].__qualname__} "
                         f"and {cls.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    """Import every module of this package once, so each registers its compressor."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{module.name}")


def compressor_classes() -> dict[str, type]:
    """Name -> compressor class, for every registered compressor (sorted by name)."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def compressor_names() -> list[str]:
    """The names ``--moe-a2a-compression`` accepts."""
    return list(compressor_classes())


def compressor_class(name: str) -> type:
    """The class registered as ``name``; one sentence naming the choices otherwise."""
    classes = compressor_classes()
    if name not in classes:
        raise ConfigError(f"--moe-a2a-compression must be one of {list(classes)}, got {name!r}")
    return classes[name]


def build_compressor(moe_config: MoEConfig, hidden_size: int, *, seed: int = 0,
                     device=None, same_node_E=None, compress: bool = True) -> Compressor:
    """The compressor ``moe_config.a2a_compression`` names, with its options (or defaults).

    ``seed`` is the MoE layer's seed: compressors with random state (LSH rotations) derive
    theirs from it, so every layer differs and every rank agrees. ``same_node_E``: which
    destination experts live on this rank's node (None: unknown). ``compress=False`` (a layer
    of ``--moe-a2a-compression-skip-layers``): ``none``, or ``cast`` in the wire format of
    ``--moe-a2a-compression-skip-dtype``.
    """
    if not compress:
        skip = moe_config.a2a_compression_skip_dtype
        cls = compressor_class("none" if skip == "none" else "cast")
        options = cls.Options() if skip == "none" else cls.Options(dtype=skip)
    else:
        cls = compressor_class(moe_config.a2a_compression)
        options = moe_config.compression_options
        if options is None:
            options = cls.Options()
        elif not isinstance(options, cls.Options):
            raise ConfigError(f"MoEConfig.compression_options is a {type(options).__name__}, "
                              f"but compressor {cls.name!r} takes {cls.Options.__name__}")
    return cls(options, hidden_size=hidden_size, num_experts=moe_config.num_experts,
               seed=seed, device=device, same_node_E=same_node_E)


def default_options(name: str) -> Optional[object]:
    """A fresh default ``Options`` object of compressor ``name``."""
    return compressor_class(name).Options()


__all__ = ["Compressor", "Rows", "weighted_sum_into_tokens", "register_compressor",
           "compressor_classes", "compressor_names", "compressor_class", "build_compressor",
           "default_options", "compression"]


def compression(name: str, **options) -> dict:
    """``MoEConfig`` keyword arguments selecting compressor ``name`` with ``options``:
    ``MoEConfig(num_experts=8, **compression("lsh", num_hashes=4))``."""
    cls = compressor_class(name)
    return {"a2a_compression": name, "compression_options": cls.Options(**options) if options
            else None}
