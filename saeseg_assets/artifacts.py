"""Between Dagster and the artifact store: an asset's input keys are the `key` metadata of its inputs' latest
materializations; its own key is its data version (unpartitioned assets) and its `key` metadata (every asset)."""

from __future__ import annotations

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
    from .core.cache import CACHE_FOLDER, ActivationCache

    key, folder = input_folder(context, storage, asset)
    return key, ActivationCache(folder / CACHE_FOLDER)


def checkpoint_import(asset: str, version: int, kind: str, storage, configured: str, inputs: dict[str, str]):
    """(checkpoint, spec) of the SAE or probe checkpoint to import instead of training (the configured path, else
    the drop folder), keyed by the sha256 of its bytes; (None, None) when there is none: train."""
    from .core.checkpoint_watch import content_sha256, find_checkpoint
    from .core.store import Spec

    checkpoint = find_checkpoint(kind, storage.root, configured)
    if checkpoint is None:
        return None, None
    # An incomplete checkpoint gets a key of its own; its import then fails naming the missing file.
    content = content_sha256(checkpoint.files)[0] if checkpoint.complete else f"incomplete:{checkpoint.source}"
    return checkpoint, Spec(asset, version, {"import_sha256": content}, inputs)


def artifact_metadata(key: str, folder: Path, reused: bool) -> dict:
    """The metadata every materialization carries: its key, its folder, and whether it was already there."""
    return {KEY: key, "path": dg.MetadataValue.path(str(folder)), "reused": reused}
