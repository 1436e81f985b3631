"""Model registry: a config's `name` picks the builder, so CLIs like `launch.describe` work for every model."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
from flax import nnx

from musicdiff.errors import ConfigError

Builder = Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module]
_BUILDERS: dict[str, Builder] = {}
# Config sections that may hold a model, in the order they are reported.
MODEL_SECTIONS = ("autoencoder", "text_encoder", "model", "conditioner", "evaluator")


def register(name: str) -> Callable[[Builder], Builder]:
    def wrap(builder: Builder) -> Builder:
        _BUILDERS[name] = builder
        return builder

    return wrap


def _load_builtin_models() -> None:
    # Importing a model module registers it; modules are imported lazily so unused models cost nothing.
    import importlib
    import pkgutil

    import musicdiff.models as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "registry":
            importlib.import_module(f"musicdiff.models.{info.name}")


def build(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    if model_config.name not in _BUILDERS:
        _load_builtin_models()
    if model_config.name not in _BUILDERS:
        raise ConfigError(
            f"config.*.name='{model_config.name}': no such model; known models: {', '.join(sorted(_BUILDERS))}"
        )
    return _BUILDERS[model_config.name](model_config, rngs)


def models_in(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The model sections of a config that name a model."""
    return {
        section: config[section]
        for section in MODEL_SECTIONS
        if section in config and isinstance(config[section], ml_collections.ConfigDict) and "name" in config[section]
    }
