"""The compression methods, by name. Adding one: a module here and one import line below."""

from __future__ import annotations

from compressor.errors import ConfigError
from compressor.methods.base import (
    GradReduction,
    LayerInfo,
    LayerKind,
    LayerStats,
    Method,
    MethodSettings,
)

_REGISTRY: dict[str, Method] = {}


def register_method(cls: type) -> type:
    """Register a method class under its `name` (used as a class decorator)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls()
    return cls


def available_methods() -> tuple[str, ...]:
    """Return the registered method names."""
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """Return the method registered as `name`; a `ConfigError` listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        ) from None


# One line per method module; each registers itself on import.
from compressor.methods import lowrank, share_values, tie_inputs, tie_rows  # noqa: E402,F401

__all__ = [
    "GradReduction", "LayerInfo", "LayerKind", "LayerStats", "Method", "MethodSettings",
    "available_methods", "get_method", "register_method",
]
