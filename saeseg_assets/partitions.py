"""The partitions of the class-wise assets: one static partition per ADE20K class, keyed `NNN_slug`.
Keys and indices come from the core class table, so assets and core can never disagree."""

from __future__ import annotations

import dagster as dg

from .core.data.ade20k import CLASSES, class_by_index, class_by_key
from .environment import ENV

class_partitions = dg.StaticPartitionsDefinition([c.key for c in CLASSES])

def class_backfill_policy(per_run: int | None) -> dg.BackfillPolicy:
    """How a backfill of the class assets splits into runs: all classes in one run, loading the shared inputs once
    (None: the default, and what `dagster asset materialize --partition-range` needs), or at most `per_run` classes
    per run (env SAESEG_CLASSES_PER_RUN), runs the daemon's queue can start side by side."""
    if per_run is None or per_run >= len(CLASSES):
        return dg.BackfillPolicy.single_run()
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=per_run)


# Both class assets take the same policy, so a backfill runs a block's class_latents and reports in one run.
CLASS_BACKFILL_POLICY = class_backfill_policy(ENV.classes_per_run)


def class_index_for_key(key: str) -> int:
    return class_by_key(key).index


def key_for_class_index(index: int) -> str:
    return class_by_index(index).key
