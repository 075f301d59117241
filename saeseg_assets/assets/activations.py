"""`train_activations` and `val_activations`: the ViT's patch activations over each split, as zarr caches."""

import dagster as dg

from ..resources import Backbone, Recording, Storage


def _record(context: dg.AssetExecutionContext, split: str, storage: Storage, backbone: Backbone,
            recording: Recording) -> dg.MaterializeResult:
    from ..core.ade20k import list_split
    from ..core.cache import ActivationCache
    from ..core.recording import cache_settings, record_split

    root = storage.dataset_root()
    samples = list_split(root, split)  # validates the whole split before anything is written
    vit = backbone.load(storage)
    settings = cache_settings(vit, recording.layer, recording.crop_size, root, split, recording.dtype)
    context.log.info(f"recording {len(samples)} {split} images from {root} with {vit.info.name}, layer {settings.layer}")
    summary = record_split(samples, vit, settings, storage.cache_path(split), chunk_images=recording.chunk_images,
                           log=context.log.info)
    cache = ActivationCache(summary.path)
    return dg.MaterializeResult(
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


@dg.asset(group_name="activations", kinds={"zarr", "pytorch"})
def train_activations(context: dg.AssetExecutionContext, storage: Storage, backbone: Backbone,
                      recording: Recording) -> dg.MaterializeResult:
    """Patch activations of the training split (zarr cache; layout in the README)."""
    return _record(context, "training", storage, backbone, recording)


@dg.asset(group_name="activations", kinds={"zarr", "pytorch"})
def val_activations(context: dg.AssetExecutionContext, storage: Storage, backbone: Backbone,
                    recording: Recording) -> dg.MaterializeResult:
    """Patch activations of the validation split (zarr cache; layout in the README)."""
    return _record(context, "validation", storage, backbone, recording)
