"""Launchpad config classes made from the core's settings models, so each setting is defined once (in
`core/settings.py`) and the launchpad shows its doc and default."""

from __future__ import annotations

import typing

import dagster as dg
import pydantic

from .core.settings import StageSettings

_SETTINGS: dict[type, type[StageSettings]] = {}
_FIXED: dict[type, dict] = {}  # per config class, the settings its asset fixes (not on the launchpad)


class SettingsConfig(dg.Config):
    """A launchpad config whose fields are those of one core settings model (plus Dagster-only fields)."""

    def settings(self, **overrides) -> StageSettings:
        """The core settings these values give, validated there; `overrides` fill in what resources decide."""
        model, fixed = _SETTINGS[type(self)], _FIXED[type(self)]
        values = {name: getattr(self, name) for name in model.model_fields if name not in fixed}
        return model(**{**values, **fixed, **overrides})


def _launchpad_type(annotation):
    # Dagster config has lists, not tuples; the core model turns the list back into its tuple.
    if typing.get_origin(annotation) is tuple:
        return list[typing.get_args(annotation)[0]]
    return annotation


def launchpad_config(name: str, model: type[StageSettings], fixed: dict | None = None,
                     **extra_fields) -> type[SettingsConfig]:
    """A `dagster.Config` class named `name` with one field per field of `model`: same type, default and doc (the
    default repeated in the doc, where the launchpad shows it). `fixed`: settings the asset decides (two assets of
    one settings model, such as the probe at the SAE's layer and at the final layer), left off the launchpad.
    `extra_fields`: (type, pydantic.Field) of settings that only the Dagster layer has, such as an import path."""
    fields = {}
    for field_name, info in model.model_fields.items():
        if field_name in (fixed or {}):
            continue
        default = list(info.default) if isinstance(info.default, tuple) else info.default
        fields[field_name] = (_launchpad_type(info.annotation),
                              pydantic.Field(default=default, description=f"{info.description} Default: {default!r}."))
    config = pydantic.create_model(name, __base__=SettingsConfig, __doc__=model.__doc__, **fields, **extra_fields)
    _SETTINGS[config] = model
    _FIXED[config] = dict(fixed or {})
    return config
