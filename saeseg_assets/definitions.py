"""The Dagster definitions: assets, checks, resources, sensors and schedules (`dagster ... -m saeseg_assets`)."""

import dagster as dg

from . import automation
from .assets import activations, codes, latents, probe, reports, sae, summary
from .checks import checks
from .resources import from_env

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([activations, sae, probe, latents, codes, reports, summary]),
    asset_checks=checks,
    resources=from_env(),
    sensors=automation.sensors,
    schedules=automation.schedules,
)
