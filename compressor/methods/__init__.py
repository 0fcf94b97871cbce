"""The compression methods, by name. Adding one: a module here and one import line below.

The registry holds each method's class; `get_method` / `configured` build the method configured
by its options, and `options_types` gives every method's options model, from which the job
config builds its `method` choice.
"""

from __future__ import annotations

from typing import Any

from compressor.errors import ConfigError
from compressor.methods.base import Approximation, GradReduction, Method, MethodOptions
from compressor.runtime.layers import LayerInfo, LayerStats

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a method class under its `name` (used as a class decorator)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    if cls.Options.model_fields["name"].default != cls.name:
        raise ValueError(f"{cls.__name__}.Options must default `name` to {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> tuple[str, ...]:
    """Return the registered method names."""
    return tuple(_REGISTRY)


def unknown_method_message(name: object) -> str:
    """Return the error for a method name that is not registered, listing the choices."""
    return f"unknown method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"


def method_class(name: str) -> type[Method]:
    """Return the class registered as `name`; a `ConfigError` listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(unknown_method_message(name)) from None


def get_method(name: str, **options: Any) -> Method:
    """Return the method registered as `name`, configured with `options` (defaults otherwise)."""
    cls = method_class(name)
    return cls(cls.Options(name=name, **options))


def configured(options: MethodOptions) -> Method:
    """Return the method that `options` (a registered method's options model) configures."""
    return method_class(options.name)(options)


def options_types() -> tuple[type[MethodOptions], ...]:
    """Return every registered method's options model, in registration order."""
    return tuple(cls.Options for cls in _REGISTRY.values())


# One line per method module; each registers itself on import.
from compressor.methods import lowrank, share_values, tie_inputs, tie_rows  # noqa: E402,F401

__all__ = [
    "Approximation", "GradReduction", "LayerInfo", "LayerStats", "Method", "MethodOptions",
    "available_methods", "configured", "get_method", "method_class", "options_types",
    "register_method", "unknown_method_message",
]
