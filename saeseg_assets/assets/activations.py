"""`train_activations` and `val_activations`: the ViT's patch activations over each split, as zarr caches.

One step records both, so the backbone is loaded once (and only when a split is not in the store yet).
"""

import hashlib

import dagster as dg

from ..artifacts import artifact_metadata
from ..resources import Backbone, Recording, Storage

SPLITS = {"train_activations": "training", "val_activations": "validation"}


@dg.multi_asset(
    specs=[
        dg.AssetSpec(key, group_name="activations", kinds={"zarr", "pytorch"},
                     description=f"Patch activations of the {split} split (zarr cache; layout in the README).")
        for key, split in SPLITS.items()
    ],
    can_subset=True,
)
def activation_caches(context: dg.AssetExecutionContext, storage: Storage, backbone: Backbone, recording: Recording):
    from ..core.ade20k import describe_preprocessing, list_split
    from ..core.cache import CACHE_FOLDER, FORMAT_VERSION, ActivationCache
    from ..core.recording import cache_settings, record_split
    from ..core.store import Spec

    root = storage.dataset_root()
    selected = [(key, split) for key, split in SPLITS.items() if dg.AssetKey(key) in context.selected_asset_keys]
    # Every selected split is validated before anything is written.
    samples = {split: list_split(root, split) for _, split in selected}
    store, vit = storage.store, None
    for asset, split in selected:
        ids = "\n".join(s.image_id for s in samples[split])
        spec = Spec(asset, FORMAT_VERSION, {
            "backbone": backbone.source, "layer": recording.layer, "crop_size": recording.crop_size,
            "dtype": recording.dtype, "preprocessing": describe_preprocessing(recording.crop_size),
            "dataset_root": str(root), "split": split, "n_images": len(samples[split]),
            "image_ids_sha256": hashlib.sha256(ids.encode()).hexdigest()})
        reused = store.exists(asset, spec.key)
        if reused:
            context.log.info(f"{asset}: reusing {store.path(asset, spec.key)} (same settings and images)")
        else:
            vit = vit or backbone.load(storage)
            settings = cache_settings(vit, recording.layer, recording.crop_size, root, split, recording.dtype)
            context.log.info(f"{asset}: {len(samples[split])} images from {root}, {vit.info.name}, "
                             f"layer {settings.layer}")
            with store.write(spec, resumable=True) as work:
                record_split(samples[split], vit, settings, work / CACHE_FOLDER, chunk_images=recording.chunk_images,
                             log=context.log.info)
        folder = store.open(asset, spec.key)
        cache = ActivationCache(folder / CACHE_FOLDER)
        yield dg.MaterializeResult(
            asset_key=asset,
            metadata={
                **artifact_metadata(spec.key, folder, reused),
                "n_images": cache.n_images,
                "n_tokens": cache.n_tokens,
                "d_model": cache.d_model,
                "backbone": str(cache.attrs["backbone"]),
                "layer": int(cache.attrs["layer"]),
                "recording_seconds": float(cache.attrs.get("seconds", 0.0)),
            },
            data_version=dg.DataVersion(spec.key),
        )
