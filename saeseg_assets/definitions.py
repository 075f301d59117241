"""The Dagster definitions: assets, checks, resources, sensors and schedules (`dagster ... -m saeseg_assets`)."""

import dagster as dg

from . import automation
from .assets import activations, latents, probe, sae, suppression
from .checks import checks
from .resources import from_env

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([activations, sae, probe, latents, suppression]),
    asset_checks=checks,
    resources=from_env(),
    sensors=automation.sensors,
    schedules=automation.schedules,
)
