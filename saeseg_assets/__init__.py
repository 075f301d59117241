"""saeseg: SAE class-suppression experiments on ADE20K-format segmentation, as Dagster assets."""

import dagster as dg

from . import automation
from .assets import activations, latents, probe, sae, suppression
from .checks import sae_checks
from .resources import from_env

defs = dg.Definitions(
    assets=[
        a.map_asset_specs(lambda spec: spec.replace_attributes(automation_condition=automation.DOWNSTREAM_CONDITION)
                          if spec.key.to_user_string() in automation.DOWNSTREAM_ASSETS else spec)
        for a in dg.load_assets_from_modules([activations, sae, probe, latents, suppression])
    ],
    asset_checks=sae_checks,
    resources=from_env(),
    sensors=automation.sensors,
    schedules=automation.schedules,
)
