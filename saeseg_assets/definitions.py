"""The Dagster definitions: assets, checks, resources, sensors and schedules (`dagster ... -m saeseg_assets`)."""

import dagster as dg

from . import automation
from .assets import activations, codes, latents, probe, reports, sae, summary
from .checks import checks
from .environment import ENV
from .resources import from_env

# Dagster's default executor, with a default of our choosing: a run that does not say runs its steps one after the
# other in its own process (no second of start-up per step; every torch step gets all the cores), unless
# SAESEG_EXECUTOR=multiprocess; either way a run's config may ask for the other ({"execution": {"config":
# {"multiprocess": {...}}}}, or "in_process").
executor = dg.multi_or_in_process_executor.configured(
    lambda config: config, name="saeseg_executor",
    config_schema=dg.Field(dg.Selector({"multiprocess": dg.Permissive(), "in_process": dg.Permissive()}),
                           default_value={ENV.executor: {}}))

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([activations, sae, probe, latents, codes, reports, summary]),
    asset_checks=checks,
    resources=from_env(),
    sensors=automation.sensors,
    schedules=automation.schedules,
    executor=executor,
)
