"""saeseg: SAE class-suppression experiments on ADE20K-format segmentation, as Dagster assets."""

import dagster as dg

from .assets import activations, latents, probe, sae, suppression
from .checks import sae_checks
from .resources import from_env

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([activations, sae, probe, latents, suppression]),
    asset_checks=sae_checks,
    resources=from_env(),
)
