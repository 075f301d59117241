"""The asset definitions, one module per stage."""

import warnings

import dagster as dg

# Backfill policies (single-run, what `--partition-range` needs; multi-run with SAESEG_CLASSES_PER_RUN) are beta in
# Dagster 1.13: the notice would print at every definitions load. Set here, before any asset module is imported.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)
