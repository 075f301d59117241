"""The one asset recipe: an asset's key from the format versions of the core modules that write its files, its
effective settings and the keys of the inputs it reads; reuse or write; the materialization, metadata readable."""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

KEY = "key"  # the metadata entry that holds an artifact's store key


@dataclass(frozen=True)
class Stage:
    """What an asset reads (its Dagster deps, the same list) and which core modules write its files: each of those
    holds one `FORMAT_VERSION`, part of the asset's key, so a format change never reuses old outputs."""

    reads: tuple[str, ...]
    writes: tuple[str, ...]  # module paths under saeseg_assets.core, e.g. "study.codes"

    def format_versions(self) -> dict[str, int]:
        # Resolved when a key is computed, inside a run: the modules import torch, the definitions must not.
        return {name: int(importlib.import_module(f"saeseg_assets.core.{name}").FORMAT_VERSION)
                for name in self.writes}


STAGES: dict[str, Stage] = {}


def stage(assets: str | tuple[str, ...], reads: tuple[str, ...] = (), writes: tuple[str, ...] = ()
          ) -> list[dg.AssetKey]:
    """Declares the stage of one asset (or of each asset of a multi-asset) and returns its deps: what it reads."""
    for asset in (assets,) if isinstance(assets, str) else assets:
        STAGES[asset] = Stage(tuple(reads), tuple(writes))
    return [dg.AssetKey(a) for a in reads]


def spec_of(asset: str, settings: dict, inputs: dict[str, str]):
    """The store spec of one output: the format versions of `asset`'s writers, its settings and input keys."""
    from .core.store.artifacts import OutputSpec

    return OutputSpec(asset, STAGES[asset].format_versions(), settings, inputs)


def latest_key(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> str:
    """The store key of the latest materialization of `asset` (of one class, for partitioned assets)."""
    asset_key = dg.AssetKey(asset)
    if partition is None:
        event = instance.get_latest_materialization_event(asset_key)
        materialization = event.asset_materialization if event else None
    else:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1).records
        materialization = records[0].asset_materialization if records else None
    if materialization is None or KEY not in materialization.metadata:
        what = f"{asset} {partition}" if partition else asset
        raise dg.Failure(f"{what} has not been materialized in this Dagster instance (DAGSTER_HOME): materialize it "
                         "first")
    return str(materialization.metadata[KEY].value)


def latest_keys(instance: dg.DagsterInstance, asset: str) -> dict[str, str]:
    """Per materialized partition of a partitioned asset, the store key of its latest materialization."""
    partitions = sorted(instance.get_materialized_partitions(dg.AssetKey(asset)))
    return {p: latest_key(instance, asset, p) for p in partitions}


def latest_folder(instance: dg.DagsterInstance, storage, asset: str, partition: str | None = None) -> Path:
    """The folder of the latest materialization of `asset`, for readers that are not assets (the checks)."""
    return storage.store.open(asset, latest_key(instance, asset, partition), partition)


class Recipe:
    """One run of one asset: reads its declared inputs' latest keys, computes its key, reuses or writes the output,
    and returns the materialization with readable metadata and the key as data version.

    Reading an input that the asset does not declare, or declaring one it never reads, fails the run: what the graph
    shows is what the key is made of."""

    def __init__(self, context, storage, asset: str | None = None):
        self.context, self.storage, self.store = context, storage, storage.store
        self.asset = asset or context.asset_key.to_user_string()
        self.stage = STAGES[self.asset]
        self.inputs: dict[str, str] = {}  # the unpartitioned inputs' keys, part of every output's key
        self.read: set[str] = set()

    def _reads(self, asset: str) -> None:
        if asset not in self.stage.reads:
            raise RuntimeError(f"{self.asset} reads {asset}, which it does not declare as an input")
        self.read.add(asset)

    def key_of(self, asset: str, partition: str | None = None) -> str:
        """The key of the latest materialization of an input this asset reads (of one class: `partition`)."""
        self._reads(asset)
        key = latest_key(self.context.instance, asset, partition)
        if partition is None:
            self.inputs[asset] = key
        return key

    def partition_keys(self, asset: str) -> dict[str, str]:
        """Per materialized class of a partitioned input, the key of its latest materialization."""
        self._reads(asset)
        return latest_keys(self.context.instance, asset)

    def folder(self, asset: str, partition: str | None = None) -> tuple[str, Path]:
        """(key, folder) of an input, refused if the folder is not complete."""
        key = self.key_of(asset, partition)
        return key, self.store.open(asset, key, partition)

    def cache(self, asset: str):
        """(key, ActivationCache) of the latest `train_activations` or `val_activations`."""
        from .core.data.cache import CACHE_FOLDER, ActivationCache

        key, folder = self.folder(asset)
        return key, ActivationCache(folder / CACHE_FOLDER)

    def output(self, settings: dict, inputs: dict[str, str] | None = None, part: str | None = None,
               asset: str | None = None) -> Output:
        """This asset's output (or one class's: `part`) made from `settings` and the unpartitioned inputs read so far,
        plus `inputs`: the keys of partitioned inputs, which the caller names (one class's, or every class's)."""
        asset = asset or self.asset
        unread = set(STAGES[asset].reads) - self.read
        if unread:
            raise RuntimeError(f"{asset} declares {sorted(unread)} as inputs but its key does not hold them")
        return Output(self, spec_of(asset, settings, {**self.inputs, **(inputs or {})}), part)


class Output:
    """One output folder in the store: whether it is there, its writer, and its materialization."""

    def __init__(self, recipe: Recipe, spec, part: str | None):
        self.recipe, self.spec, self.part = recipe, spec, part
        self.store = recipe.store
        self.reused = self.store.exists(spec.asset, spec.key, part)
        if self.reused:
            what = f"{spec.asset} {part}" if part else spec.asset
            recipe.context.log.info(f"{what}: reusing {self.store.path(spec.asset, spec.key, part)} (same settings "
                                    "and inputs)")

    @property
    def key(self) -> str:
        return self.spec.key

    @contextmanager
    def write(self, resumable: bool = False) -> Iterator[Path]:
        """The folder to fill; published whole when the block ends without an error."""
        with self.store.write(self.spec, part=self.part, resumable=resumable,
                              log=self.recipe.context.log.info) as work:
            yield work

    @property
    def folder(self) -> Path:
        return self.store.open(self.spec.asset, self.spec.key, self.part)

    def metadata(self, extra: dict) -> dict:
        """`extra` (the answer first), then the key, folder (`shown_path`) and reuse, rounded as the UI shows
        numbers."""
        return readable({**extra, KEY: self.key, "path": dg.MetadataValue.path(shown_path(self.folder)),
                         "reused": self.reused})

    def result(self, extra: dict) -> dg.MaterializeResult:
        """The materialization of an unpartitioned asset: its metadata and the key as data version."""
        return dg.MaterializeResult(asset_key=self.spec.asset, metadata=self.metadata(extra),
                                    data_version=dg.DataVersion(self.key))

    def record(self, extra: dict) -> None:
        """One class's metadata, in a run that materializes many classes of a partitioned asset."""
        self.recipe.context.add_asset_metadata(self.metadata(extra), partition_key=self.part)


@contextmanager
def checkpoint_import(recipe: Recipe, kind: str, configured: str, settings: dict | None = None):
    """Yields (checkpoint, output) of the SAE or probe checkpoint to import instead of training (the configured path,
    else the drop folder); (None, None) when there is none: train.

    The checkpoint yielded is a copy of the files in a temporary folder, and the key is the sha256 of the copied
    bytes, so the import reads exactly what was hashed; where the run was launched by a checkpoint sensor, that hash
    must be the one the sensor saw (its tag), or the run fails before anything is written. `settings`: import
    settings that change the result, part of the key. Errors about the copy name the original files."""
    from .automation import CHECKPOINT_TAG
    from .core.store.checkpoint_watch import find_checkpoint, snapshot
    from .core.store.checkpoints import CheckpointError

    storage, context = recipe.storage, recipe.context
    checkpoint = find_checkpoint(kind, storage.root, configured)
    if checkpoint is None:
        yield None, None
        return
    if not checkpoint.complete:
        # An incomplete checkpoint gets a key of its own; its import then fails naming the missing file.
        yield checkpoint, recipe.output({"import_sha256": f"incomplete:{checkpoint.source}", **(settings or {})})
        return
    storage.root.mkdir(parents=True, exist_ok=True)
    original = checkpoint.source if checkpoint.source not in checkpoint.files else checkpoint.source.parent
    with tempfile.TemporaryDirectory(prefix=f".import-{kind}-", dir=storage.root) as tmp:
        try:
            copy, sha256 = snapshot(checkpoint, Path(tmp))
        except FileNotFoundError as exc:
            raise dg.Failure(str(exc)) from exc
        seen = context.run.tags.get(CHECKPOINT_TAG)
        if seen and seen != sha256:
            raise dg.Failure(f"{checkpoint.source}: the content changed after the sensor saw it (sha256 {seen} then, "
                             f"{sha256} as read now): not imported; the sensor imports the new content once it has "
                             "settled")
        try:
            yield copy, recipe.output({"import_sha256": sha256, **(settings or {})})
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(str(tmp), str(original))) from exc


def shown_path(folder: Path) -> str:
    """A folder as metadata shows it: relative to the working directory (the project's root, where the CLI and the
    UI run) when it lies inside it, else absolute. The UI shows a path unbroken, and a long one widens its value
    column until the answer in the first entry is cut off on the right."""
    folder, here = Path(folder).resolve(), Path.cwd().resolve()
    return str(folder.relative_to(here)) if folder.is_relative_to(here) else str(folder)


def readable(metadata: dict) -> dict:
    """Metadata as the UI shows it: every float (plain and in JSON values) rounded to 4 significant digits
    (`core.tables.significant`); the files keep full precision. Every asset passes its metadata through this; markdown
    tables round the same way (`core.tables.markdown_table`)."""
    from .core.report.tables import significant

    def rounded(value):
        if isinstance(value, dg.FloatMetadataValue):
            return dg.MetadataValue.float(significant(value.value)) if value.value is not None else value
        if isinstance(value, dg.JsonMetadataValue):
            return dg.MetadataValue.json(significant(value.data))
        return value if isinstance(value, dg.MetadataValue) else significant(value)

    return {name: rounded(value) for name, value in metadata.items()}
