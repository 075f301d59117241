"""The definitions without sensors and schedules: for a daemon in the PostgreSQL tests that runs only the backfills
and runs a test asks for (the checkpoint sensors would import the configured checkpoints at their first tick)."""

import dagster as dg

from saeseg_assets import definitions

defs = dg.Definitions(assets=definitions.defs.assets, asset_checks=definitions.defs.asset_checks,
                      resources=definitions.defs.resources)
