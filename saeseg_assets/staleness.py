"""What is stale in an instance (an input's data or an asset's code version changed since it was made) and what
exists below it, as run requests over contiguous blocks of classes: the nightly schedule's engine."""

from __future__ import annotations

import graphlib
import itertools

import dagster as dg

# Which of a nightly tick's runs this is, "1/2": a run-queue limit of 1 on this tag runs them in order.
STALE_BLOCK_TAG = "saeseg/stale_block"
# Dagster tags with no public equivalent: a materialization's data version is kept only in this tag of its event (an
# AssetObservation has `.data_version`, an AssetMaterialization nothing), and a run request covers a range of
# partitions only through these two (RunRequest takes one partition key). test_dagster_internals.py fails, naming
# the tag, if Dagster stops writing or reading any of them.
DATA_VERSION_TAG = "dagster/data_version"
PARTITION_RANGE_TAGS = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")


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
    """Whether the code version or the data of an input changed since `record` was made. Dagster records with each
    materialization its code version and, per input, the input's latest event at the time (the pointer); an input
    changed if its latest event for the partitions read is newer than that and has another data version."""
    provenance = dg.DataProvenance.from_tags(record.asset_event.tags or {})
    code_version = graph.specs[key].code_version
    if code_version is not None and (provenance is None or provenance.code_version != code_version):
        return True
    pointers = provenance.input_storage_ids if provenance else {}
    for parent in graph.parents[key]:
        # Without a pointer (a runless report, or an input that did not exist yet) any newer input event counts.
        cursor = pointers.get(parent)
        cursor = record.storage_id if cursor is None else cursor
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
    at most its classes per run), in class order. Assets above the classes go with the first block, a summary below
    them with the last."""
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
            tags |= dict(zip(PARTITION_RANGE_TAGS, (keys[0], keys[-1])))
        # A schedule's runs need keys (one run per key per tick, even when the tick is retried).
        requests.append(dg.RunRequest(run_key=f"{keys[0]}...{keys[-1]}" if keys else "unpartitioned",
                                      asset_selection=sorted(selection, key=lambda k: k.to_user_string()), tags=tags))
    return requests


def _chunks(keys: list[str], size: int | None) -> list[list[str]]:
    """`keys` in consecutive runs of at most `size` (None: all in one); no keys: one empty run."""
    size = size or max(len(keys), 1)
    return [keys[a:a + size] for a in range(0, max(len(keys), 1), size)]
