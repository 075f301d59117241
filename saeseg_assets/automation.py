"""Automatic re-runs: sensors that import a changed SAE or probe checkpoint, the condition that re-runs what depends
on a changed input, and a nightly schedule that re-materializes whatever is stale (README, "Automatic re-runs").
"""

from __future__ import annotations

import graphlib
import itertools

import dagster as dg

from .core.store.checkpoint_watch import WatchState, observe, step
from .environment import ENV
from .resources import Checkpoints, Storage

# A test (or an impatient user) can poll every second or two (env SAESEG_SENSOR_INTERVAL_S).
SENSOR_INTERVAL_S = ENV.sensor_interval_s
# How long a checkpoint's files must have stayed untouched before the sensors import it (core.checkpoint_watch).
CHECKPOINT_QUIET_S = ENV.checkpoint_quiet_s
NIGHTLY_CRON = "0 3 * * *"
IMPORT_ASSETS = {"sae": "sae_weights", "probe": "probe_checkpoint"}
CHECKPOINT_TAG = "saeseg/checkpoint_sha256"
# Which of a nightly tick's runs this is, "1/2": a run-queue limit of 1 on this tag runs them in order.
STALE_BLOCK_TAG = "saeseg/stale_block"
# Tags Dagster writes on every materialization (its data provenance).
DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"
INPUT_POINTER_TAG_PREFIX = "dagster/input_event_pointer"

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


class _Graph:
    """The assets of a repository as the staleness walk needs them, read from their public specs. Partition mappings
    are Dagster's defaults: class to the same class, unpartitioned to every class, every class to a summary."""

    def __init__(self, repository: dg.RepositoryDefinition):
        defs = repository.assets_defs_by_key
        self.specs = {key: d.get_asset_spec(key) for key, d in defs.items()}
        self.parents = {key: {dep.asset_key for dep in spec.deps} for key, spec in self.specs.items()}
        # A multi-asset that cannot run a subset of its keys runs them all.
        self.run_with = {key: set(d.keys) if not d.can_subset else {key} for key, d in defs.items()}
        # The most classes one run of an asset takes (a multi-run backfill policy: SAESEG_CLASSES_PER_RUN).
        self.per_run = {key: d.backfill_policy.max_partitions_per_run if d.backfill_policy else None
                        for key, d in defs.items()}
        self.sources = repository.source_assets_by_key
        self.order = [key for key in graphlib.TopologicalSorter(self.parents).static_order() if key in self.specs]
        self.below_classes: dict[dg.AssetKey, bool] = {}
        for key in self.order:
            self.below_classes[key] = any(self.partitioned(p) or self.below_classes.get(p, False)
                                          for p in self.parents[key])

    def partitions_def(self, key: dg.AssetKey) -> dg.PartitionsDefinition | None:
        node = self.specs.get(key) or self.sources.get(key)
        return node.partitions_def if node else None

    def partitioned(self, key: dg.AssetKey) -> bool:
        return self.partitions_def(key) is not None


class _Events:
    """The latest materialization per asset and partition (for an observed source, its latest observation), each
    asset read once."""

    def __init__(self, instance: dg.DagsterInstance):
        self.instance = instance
        self._latest: dict[dg.AssetKey, dict[str | None, dg.EventLogRecord]] = {}
        self._observed: set[dg.AssetKey] = set()

    def latest(self, key: dg.AssetKey) -> dict[str | None, dg.EventLogRecord]:
        if key not in self._latest:
            found: dict[str | None, dg.EventLogRecord] = {}
            cursor, more = None, True
            while more:  # newest first
                result = self.instance.fetch_materializations(key, limit=1000, cursor=cursor)
                for record in result.records:
                    found.setdefault(record.partition_key, record)
                cursor, more = result.cursor, result.has_more
            if not found and (observed := self.instance.fetch_observations(key, limit=1).records):
                found = {None: observed[0]}
                self._observed.add(key)
            self._latest[key] = found
        return self._latest[key]

    def at(self, key: dg.AssetKey, partition: str | None, storage_id: int) -> dg.EventLogRecord | None:
        """The event of (key, partition) that was the latest one at `storage_id`."""
        fetch = self.instance.fetch_observations if key in self._observed else self.instance.fetch_materializations
        records = fetch(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None,
                                              before_storage_id=storage_id + 1), limit=1).records
        return records[0] if records else None


def _data_version(record: dg.EventLogRecord) -> str | None:
    return (record.asset_event.tags or {}).get(DATA_VERSION_TAG)


def _is_stale(graph: _Graph, events: _Events, key: dg.AssetKey, partition: str | None,
              record: dg.EventLogRecord) -> bool:
    """Whether the code version or the data of an input changed since `record` was made. Dagster tags each
    materialization with its code version and, per input, the input's latest event at the time (the pointer); an
    input changed if its latest event for the partitions read is newer than that and has another data version."""
    tags = record.asset_event.tags or {}
    code_version = graph.specs[key].code_version
    if code_version is not None and tags.get(CODE_VERSION_TAG) != code_version:
        return True
    for parent in graph.parents[key]:
        pointer = tags.get(f"{INPUT_POINTER_TAG_PREFIX}/{parent.to_user_string()}", "")
        # Without a pointer (a runless report, or an input that did not exist yet) any newer input event counts.
        cursor = int(pointer) if pointer.isdigit() else record.storage_id
        current = events.latest(parent)
        if not graph.partitioned(parent):
            read = [None]
        else:
            read = list(current) if partition is None else [partition]  # a summary reads every class
        for p in read:
            now = current.get(p)
            if now is not None and now.storage_id > cursor:
                then = events.at(parent, p, cursor)
                if then is None or _data_version(now) is None or _data_version(then) != _data_version(now):
                    return True
    return False


def _stale_and_downstream(graph: _Graph, events: _Events) -> dict[dg.AssetKey, set[str | None]]:
    """Per asset, the partitions (None: unpartitioned) to redo: what is stale and what exists downstream of it
    (Dagster marks stale only the direct children of a change). Missing partitions are not filled in."""
    affected: dict[dg.AssetKey, set[str | None]] = {}
    for key in graph.order:
        partitions_def = graph.partitions_def(key)
        valid = set(partitions_def.get_partition_keys()) if partitions_def else {None}
        existing = {p: record for p, record in events.latest(key).items() if p in valid}
        todo: set[str | None] = set()
        for parent in graph.parents[key] & affected.keys():
            if None in affected[parent] or partitions_def is None:
                todo |= existing.keys()  # an unpartitioned input, or a summary over classes: everything that exists
            else:
                todo |= affected[parent] & existing.keys()  # class to class
        todo |= {p for p, record in existing.items()
                 if p not in todo and _is_stale(graph, events, key, p, record)}
        if todo:
            affected[key] = todo
    return affected


def stale_requests(instance: dg.DagsterInstance, repository: dg.RepositoryDefinition) -> list[dg.RunRequest]:
    """Runs over what is stale and what exists downstream of it, exactly those classes: one run per contiguous block
    of classes with the same assets to redo (a single-run backfill policy takes a range; a multi-run one, blocks of
    at most its classes per run), in class order. Assets
    above the classes go with the first block, a summary below them with the last."""
    graph = _Graph(repository)
    affected = _stale_and_downstream(graph, _Events(instance))
    if not affected:
        return []
    classes: dict[str, set[dg.AssetKey]] = {}
    above, below = set(), set()
    for key, partitions in affected.items():
        if graph.partitioned(key):
            for p in partitions:
                classes.setdefault(p, set()).add(key)
        else:
            (below if graph.below_classes[key] else above).add(key)
    order = next((graph.partitions_def(k).get_partition_keys() for k in affected if graph.partitioned(k)), [])
    blocks = [(list(keys), assets) for assets, keys in itertools.groupby(order, lambda p: frozenset(classes.get(p, ())))
              if assets] or [([], frozenset())]
    blocks = [(chunk, assets) for keys, assets in blocks
              for chunk in _chunks(keys, min((graph.per_run[k] for k in assets if graph.per_run[k]), default=None))]
    requests = []
    for i, (keys, assets) in enumerate(blocks):
        selection = set(assets) | (above if i == 0 else set()) | (below if i == len(blocks) - 1 else set())
        selection = set().union(*(graph.run_with[k] for k in selection))
        tags = {STALE_BLOCK_TAG: f"{i + 1}/{len(blocks)}"}
        if keys:
            tags |= {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
        # A schedule's runs need keys (one run per key per tick, even when the tick is retried).
        requests.append(dg.RunRequest(run_key=f"{keys[0]}...{keys[-1]}" if keys else "unpartitioned",
                                      asset_selection=sorted(selection, key=lambda k: k.to_user_string()), tags=tags))
    return requests


def _chunks(keys: list[str], size: int | None) -> list[list[str]]:
    """`keys` in consecutive runs of at most `size` (None: all in one); no keys: one empty run."""
    size = size or max(len(keys), 1)
    return [keys[a:a + size] for a in range(0, max(len(keys), 1), size)]


@dg.schedule(name="nightly_stale_refresh", cron_schedule=NIGHTLY_CRON, target=dg.AssetSelection.all(),
             default_status=dg.DefaultScheduleStatus.STOPPED,
             description="At 03:00, re-runs whatever is stale (an input changed since it was made) and what exists "
                         "below it: one run per contiguous block of stale classes. Stopped by default: on a laptop it "
                         "could start hours of SAE training unattended.")
def nightly_stale_refresh(context: dg.ScheduleEvaluationContext):
    return stale_requests(context.instance, context.repository_def) or dg.SkipReason("nothing is stale")


sensors = [sae_checkpoint_sensor, probe_checkpoint_sensor, downstream_automation_sensor]
schedules = [nightly_stale_refresh]
