"""`train_activations` and `val_activations`: the ViT's patch activations over each split, as zarr caches.

One step records both, so the backbone is loaded once and the two recordings do not compete for the cores.
"""

import dagster as dg

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
    from ..core.ade20k import list_split
    from ..core.cache import ActivationCache
    from ..core.recording import cache_settings, record_split

    root = storage.dataset_root()
    selected = [(key, split) for key, split in SPLITS.items() if dg.AssetKey(key) in context.selected_asset_keys]
    # Every selected split is validated before anything is written.
    samples = {split: list_split(root, split) for _, split in selected}
    vit = backbone.load(storage)
    for key, split in selected:
        settings = cache_settings(vit, recording.layer, recording.crop_size, root, split, recording.dtype)
        context.log.info(f"{key}: {len(samples[split])} images from {root}, {vit.info.name}, layer {settings.layer}")
        summary = record_split(samples[split], vit, settings, storage.cache_path(split),
                               chunk_images=recording.chunk_images, log=context.log.info)
        cache = ActivationCache(summary.path)
        yield dg.MaterializeResult(
            asset_key=key,
            metadata={
                "n_images": cache.n_images,
                "n_tokens": cache.n_tokens,
                "d_model": cache.d_model,
                "backbone": settings.backbone,
                "layer": settings.layer,
                "path": dg.MetadataValue.path(str(summary.path)),
                "seconds": round(summary.seconds, 2),
                "images_per_second": round(summary.images_per_second, 2) if summary.n_recorded else 0.0,
                "reused": summary.n_recorded == 0,
                "fingerprint": cache.fingerprint,
            },
            data_version=dg.DataVersion(cache.fingerprint),
        )
