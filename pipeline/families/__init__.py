"""Model families: every module in this package that defines ``FAMILIES`` (a tuple of ``ModelFamily``) is one
plug-in, found at import; ``register`` adds one from elsewhere (a test, a user's own package).

    family_for(config)   the one family whose ``matches(config)`` is true, else a one-line ConfigError

To add a family: write ``pipeline/families/<name>.py`` with a ``ModelFamily`` subclass and ``FAMILIES = (...)``
(see ``base.py`` for the interface and ``compvis_ldm.py`` for an example). Nothing else changes.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ldm.util import ConfigError
from pipeline.families.base import ModelFamily, config_target

_REGISTRY: list[ModelFamily] = []


def register(family: ModelFamily) -> ModelFamily:
    """Add a family (later registrations are tried first, so a plug-in can specialise a built-in one)."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"expected a ModelFamily, got {type(family).__name__}")
    _REGISTRY.insert(0, family)
    return family


def unregister(family: ModelFamily) -> None:
    _REGISTRY.remove(family)


def families() -> tuple[ModelFamily, ...]:
    return tuple(_REGISTRY)


def family_for(config: Any, config_name: str = "config") -> ModelFamily:
    """The family of a CompVis config (checked on the yaml alone, before any model is built)."""
    for family in _REGISTRY:
        if family.matches(config):
            family.check_config(config, config_name)
            return family
    target = config_target(config) or "no model.target"
    raise ConfigError(f"{config_name} ({target}) belongs to no known model family; known: "
                      f"{', '.join(f.name for f in _REGISTRY)} (add one in pipeline/families/)")


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            module = importlib.import_module(f"{__name__}.{info.name}")
            for family in reversed(getattr(module, "FAMILIES", ())):
                register(family)


_discover()

__all__ = ["ModelFamily", "register", "unregister", "families", "family_for"]
