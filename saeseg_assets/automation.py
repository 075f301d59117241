"""Automatic re-runs: sensors that import a changed SAE or probe checkpoint, the condition that re-runs what depends
on a changed input, and a nightly schedule that re-materializes whatever is stale (README, "Automatic re-runs").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from .core.checkpoint_watch import WatchState, find_checkpoint, observe, step
from .resources import Checkpoints, Storage

if TYPE_CHECKING:
    from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph

# Read at load time so a test (or an impatient user) can poll every second or two.
SENSOR_INTERVAL_S = int(os.environ.get("SAESEG_SENSOR_INTERVAL_S", "30"))
NIGHTLY_CRON = "0 3 * * *"
IMPORT_ASSETS = {"sae": "sae_weights", "probe": "probe_checkpoint"}
CHECKPOINT_TAG = "saeseg/checkpoint_sha256"

# Re-run an asset (every existing partition of it) when the data version of one of its inputs changes, or an input
# is requested in the same tick and can run in the same run (so the chain needs one tick per change between
# unpartitioned and class-partitioned assets, three for a new SAE). Unlike `eager()`, partitions never materialized are
# not filled in (materializing one class does not start the other 149), a re-import of identical weights re-runs
# nothing, and a summary over some classes is not blocked by the classes missing. Parent updates made by a run that
# also targeted this asset are left to that run, as in `eager()`.
DOWNSTREAM_CONDITION = (
    dg.AutomationCondition.any_deps_match(
        (dg.AutomationCondition.data_version_changed() & ~dg.AutomationCondition.executed_with_root_target())
        | dg.AutomationCondition.will_be_requested()
    ).since_last_handled()
    & ~dg.AutomationCondition.missing()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("inputs_changed")

DOWNSTREAM_ASSETS = ("baseline_metrics", "latent_stats", "val_codes", "class_latents", "suppression_report",
                     "suppression_summary")


def checkpoint_to_import(kind: str, storage: Storage, configured: str) -> Path | None:
    """What the import asset reads: the configured path if set, else the drop folder's checkpoint; None: train."""
    checkpoint = find_checkpoint(kind, storage.root, configured)
    return checkpoint.source if checkpoint else None


def _checkpoint_sensor(kind: str) -> dg.SensorDefinition:
    asset = IMPORT_ASSETS[kind]

    @dg.sensor(name=f"{kind}_checkpoint_sensor", target=dg.AssetSelection.assets(asset),
               default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=SENSOR_INTERVAL_S,
               description=f"Imports a new {kind} checkpoint into `{asset}` once its content has stayed the same "
                           f"for two looks: data/checkpoints/{kind}/ or the configured path.")
    def watch(context: dg.SensorEvaluationContext, storage: Storage, checkpoints: Checkpoints):
        seen = observe(kind, storage.root, getattr(checkpoints, kind))
        state, accepted = step(WatchState.from_json(context.cursor), seen)
        context.update_cursor(state.to_json())
        if accepted is None:
            waiting = f"waiting for {state.pending.source} to stay unchanged" if state.pending else "no new content"
            return dg.SkipReason(waiting if seen else f"no complete {kind} checkpoint")
        # The hash as run key: the same content is imported once, even after the cursor is reset.
        return dg.RunRequest(run_key=accepted, asset_selection=[dg.AssetKey(asset)],
                             tags={CHECKPOINT_TAG: accepted, "saeseg/checkpoint": seen.source})

    return watch


sae_checkpoint_sensor = _checkpoint_sensor("sae")
probe_checkpoint_sensor = _checkpoint_sensor("probe")

# The built-in automation sensor starts stopped; this one runs whenever the daemon does. Emitted as backfills, the
# classes of a single-run-backfill asset re-run as one run per contiguous block of classes, not one run per class.
downstream_automation_sensor = dg.AutomationConditionSensorDefinition(
    "downstream_automation_sensor", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=SENSOR_INTERVAL_S, emit_backfills=True,
    description="Re-runs what depends on a changed checkpoint or input (DOWNSTREAM_CONDITION).")


def stale_request(instance: dg.DagsterInstance, asset_graph: BaseAssetGraph) -> dg.RunRequest | None:
    """One run over what is stale (an input changed since it was made) and what exists downstream of it; missing
    partitions are not filled in. Classes go as one partition range, from the first to the last affected class."""
    affected = _stale_and_downstream(instance, asset_graph)
    if not affected:
        return None
    tags = {}
    partitioned = [k for k in affected if asset_graph.get(k).partitions_def]
    if partitioned:
        order = asset_graph.get(partitioned[0]).partitions_def.get_partition_keys()
        indices = sorted({order.index(p) for k in partitioned for p in affected[k]})
        tags = {"dagster/asset_partition_range_start": order[indices[0]],
                "dagster/asset_partition_range_end": order[indices[-1]]}
    return dg.RunRequest(asset_selection=sorted(affected, key=lambda k: k.to_user_string()), tags=tags)


def _stale_and_downstream(instance: dg.DagsterInstance, asset_graph: BaseAssetGraph) -> dict[dg.AssetKey, set]:
    """Per asset, the partitions (None: unpartitioned) to redo. Dagster marks stale only the direct children of a
    change, so what exists further down is added here, walking the graph in order."""
    # Dagster's own staleness (the UI's "stale" badge); internal API, pinned with dagster==1.13.27.
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._time import get_current_datetime

    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=asset_graph)
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=asset_graph, loading_context=view)
    affected: dict[dg.AssetKey, set] = {}
    for key in asset_graph.toposorted_asset_keys:
        node = asset_graph.get(key)
        if not node.is_materializable:
            continue
        if node.partitions_def is None:
            existing = {None} if instance.get_latest_materialization_event(key) else set()
        else:
            existing = set(instance.get_materialized_partitions(key))
        todo = {p for p in existing if resolver.get_status(key, p) == StaleStatus.STALE}
        for parent in node.parent_keys & affected.keys():
            if None in affected[parent] or node.partitions_def is None:
                todo |= existing  # an unpartitioned input, or a summary over classes: everything that exists
            else:
                todo |= affected[parent] & existing  # class to class
        if todo:
            affected[key] = todo
    return affected


@dg.schedule(name="nightly_stale_refresh", cron_schedule=NIGHTLY_CRON, target=dg.AssetSelection.all(),
             default_status=dg.DefaultScheduleStatus.STOPPED,
             description="At 03:00, one run over whatever is stale (an input changed since it was made). Stopped by "
                         "default: on a laptop it could start hours of SAE training unattended.")
def nightly_stale_refresh(context: dg.ScheduleEvaluationContext):
    request = stale_request(context.instance, context.repository_def.asset_graph)
    return request or dg.SkipReason("nothing is stale")


sensors = [sae_checkpoint_sensor, probe_checkpoint_sensor, downstream_automation_sensor]
schedules = [nightly_stale_refresh]
