"""Between Dagster and the artifact store: an asset's input keys are the `key` metadata of its inputs' latest
materializations; its own key is its data version (unpartitioned assets) and its `key` metadata (every asset)."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

KEY = "key"  # the metadata entry that holds an artifact's store key


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


def input_folder(context, storage, asset: str, partition: str | None = None) -> tuple[str, Path]:
    """(key, folder) of the latest materialization of an input asset, refused if the folder is not complete."""
    key = latest_key(context.instance, asset, partition)
    return key, storage.store.open(asset, key, partition)


def input_cache(context, storage, asset: str):
    """(key, ActivationCache) of the latest `train_activations` or `val_activations`."""
    from .core.data.cache import CACHE_FOLDER, ActivationCache

    key, folder = input_folder(context, storage, asset)
    return key, ActivationCache(folder / CACHE_FOLDER)


def check_same_dataset(storage, train_key: str, val_key: str) -> None:
    """Refuses to combine a training and a validation cache recorded from different datasets (or from one dataset
    before and after its files changed), naming both."""
    from .core.data.cache import CACHE_FOLDER, ActivationCache

    caches = [ActivationCache(storage.store.open(asset, key) / CACHE_FOLDER)
              for asset, key in (("train_activations", train_key), ("val_activations", val_key))]
    # Caches made without a dataset fingerprint (synthetic ones) are told apart by their dataset root.
    datasets = [c.attrs.get("dataset_fingerprint") or c.attrs.get("dataset_root") for c in caches]
    if datasets[0] != datasets[1]:
        train, val = (f"{c.path} (dataset {d} under {c.attrs.get('dataset_root')})" for c, d in zip(caches, datasets))
        raise dg.Failure(f"{train} and {val} were recorded from different datasets: materialize train_activations and "
                         "val_activations together, so that both come from the dataset as it is now")


@contextmanager
def checkpoint_import(context, asset: str, version: int, kind: str, storage, configured: str,
                      inputs: dict[str, str], settings: dict | None = None):
    """Yields (checkpoint, spec) of the SAE or probe checkpoint to import instead of training (the configured path,
    else the drop folder); (None, None) when there is none: train.

    The checkpoint yielded is a copy of the files in a temporary folder, and the key is the sha256 of the copied
    bytes, so the import reads exactly what was hashed; where the run was launched by a checkpoint sensor, that hash
    must be the one the sensor saw (its tag), or the run fails before anything is written. `settings`: import
    settings that change the result, part of the key. Errors about the copy name the original files."""
    from .automation import CHECKPOINT_TAG
    from .core.store.artifacts import Spec
    from .core.store.checkpoint_watch import find_checkpoint, snapshot
    from .core.store.checkpoints import CheckpointError

    checkpoint = find_checkpoint(kind, storage.root, configured)
    if checkpoint is None:
        yield None, None
        return
    if not checkpoint.complete:
        # An incomplete checkpoint gets a key of its own; its import then fails naming the missing file.
        yield checkpoint, Spec(asset, version, {"import_sha256": f"incomplete:{checkpoint.source}", **(settings or {})},
                               inputs)
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
            yield copy, Spec(asset, version, {"import_sha256": sha256, **(settings or {})}, inputs)
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(str(tmp), str(original))) from exc


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


def artifact_metadata(key: str, folder: Path, reused: bool) -> dict:
    """The metadata every materialization carries: its key, its folder, and whether it was already there."""
    return {KEY: key, "path": dg.MetadataValue.path(str(folder)), "reused": reused}
