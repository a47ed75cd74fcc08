"""Architecture registry: a name maps to a family class and a frozen config dataclass.

A variant is a config, not a subclass. Families register their variants when ``ornis.models`` is imported.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ornis.errors import UnknownModelError
from ornis.models.base import Encoder


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: its name, its family's class and its frozen config."""

    name: str
    cls: type[Encoder]
    config: Any  # a frozen dataclass of the family

    @property
    def family(self) -> str:
        """The family's name (``"vit"``, ``"hiera"``, ...)."""
        return self.cls.family

    @property
    def default_size(self) -> tuple[int, int]:
        """The input size the variant is laid out for unless told otherwise."""
        return (self.config.default_size, self.config.default_size)


_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, cls: type[Encoder], config: Any) -> None:
    """Add an architecture: ``name`` builds ``cls(config, ...)``; ``config`` must be a frozen dataclass."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    if not dataclasses.is_dataclass(config) or not config.__dataclass_params__.frozen:
        raise TypeError(f"{name}: a model config must be a frozen dataclass, got {type(config).__name__}")
    _MODELS[name] = ModelSpec(name, cls, config)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered architecture names, sorted; ``pattern`` is a shell-style filter such as ``'hiera*'``."""
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_model_spec(name: str) -> ModelSpec:
    """The registered architecture ``name``; ``UnknownModelError`` (with close matches) when there is none."""
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownModelError(name, _MODELS, what="architecture") from None


def families_with(capability: type) -> list[str]:
    """The families (sorted names) whose class has ``capability`` (a mixin of ``ornis.models.capabilities``)."""
    return sorted({spec.family for spec in _MODELS.values() if issubclass(spec.cls, capability)})


def apply_overrides(config: Any, overrides: Mapping[str, Any] | None) -> Any:
    """A copy of ``config`` with fields replaced. Keys may be ornis field names or the reference's config keys
    (each config class lists those in ``ALIASES``: reference key -> (field, value map or None))."""
    if not overrides:
        return config
    aliases: dict[str, tuple[str, dict | None]] = getattr(config, "ALIASES", {})
    fields = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in fields:
            changes[key] = value
        elif key in aliases:
            field, mapping = aliases[key]
            changes[field] = mapping[value] if mapping is not None else value
        else:
            known = sorted(fields | set(aliases))
            raise ValueError(f"config key {key!r} is not known to {type(config).__name__} (known: {', '.join(known)})")
    return dataclasses.replace(config, **changes)


def build_model(
    name: str,
    *,
    num_classes: int = 0,
    size: int | tuple[int, int] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Encoder:
    """Build an architecture by name with fresh (randomly initialised) weights.

    ``size`` is the input size the position embeddings are laid out for (default: the variant's), ``config``
    overrides fields of the variant's config.
    """
    spec = get_model_spec(name)
    cfg = apply_overrides(spec.config, config)
    if size is None:
        size = (cfg.default_size, cfg.default_size)
    elif isinstance(size, int):
        size = (size, size)
    return spec.cls(cfg, num_classes=num_classes, size=tuple(size), name=name)
