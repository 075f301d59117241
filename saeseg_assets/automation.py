"""Automatic re-runs (docs/automation.md): sensors that import a changed SAE or probe checkpoint, the condition
that re-runs what depends on a changed input, and the nightly schedule over what is stale (staleness.py)."""

from __future__ import annotations

import dagster as dg

from .core.store.checkpoint_watch import WatchState, observe, step
from .environment import ENV
from .resources import Checkpoints, Storage
from .staleness import stale_requests

# A test (or an impatient user) can poll every second or two (env SAESEG_SENSOR_INTERVAL_S).
SENSOR_INTERVAL_S = ENV.sensor_interval_s
# How long a checkpoint's files must have stayed untouched before the sensors import it (core.checkpoint_watch).
CHECKPOINT_QUIET_S = ENV.checkpoint_quiet_s
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


def _checkpoint_sensor(kind: str) -> dg.SensorDefinition:
    asset = IMPORT_ASSETS[kind]

    @dg.sensor(name=f"{kind}_checkpoint_sensor", target=dg.AssetSelection.assets(asset),
               default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=SENSOR_INTERVAL_S,
               description=f"Imports a new {kind} checkpoint into `{asset}` once its content and times have stayed "
                           f"the same for two looks and its files untouched for {CHECKPOINT_QUIET_S:.0f} s: "
                           f"data/checkpoints/{kind}/ or the configured path. The import checks that it reads the "
                           "content seen here.")
    def watch(context: dg.SensorEvaluationContext, storage: Storage, checkpoints: Checkpoints):
        seen = observe(kind, storage.root, getattr(checkpoints, kind))
        state, accepted = step(WatchState.from_json(context.cursor), seen, quiet_s=CHECKPOINT_QUIET_S)
        context.update_cursor(state.to_json())
        if accepted is None:
            waiting = (f"waiting for {state.pending.source} to stay unchanged for {CHECKPOINT_QUIET_S:.0f} s"
                       if state.pending else "no new content")
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


@dg.schedule(name="nightly_stale_refresh", cron_schedule=NIGHTLY_CRON, target=dg.AssetSelection.all(),
             default_status=dg.DefaultScheduleStatus.STOPPED,
             description="At 03:00, re-runs whatever is stale (an input changed since it was made) and what exists "
                         "below it: one run per contiguous block of stale classes. Stopped by default: on a laptop it "
                         "could start hours of SAE training unattended.")
def nightly_stale_refresh(context: dg.ScheduleEvaluationContext):
    return stale_requests(context.instance, context.repository_def) or dg.SkipReason("nothing is stale")


sensors = [sae_checkpoint_sensor, probe_checkpoint_sensor, downstream_automation_sensor]
schedules = [nightly_stale_refresh]
