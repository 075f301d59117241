"""saeseg: SAE class-suppression experiments on ADE20K-format segmentation, as Dagster assets."""

import dagster as dg

from .assets import activations
from .resources import from_env

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([activations]),
    resources=from_env(),
)
