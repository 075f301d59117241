"""`train_activations` and `val_activations`: the ViT's patch activations over each split, as zarr caches.

One step records both, so the backbone is loaded once (and only when a split is not in the store yet).
"""

import dagster as dg

from ..recipe import Recipe, stage
from ..resources import Backbone, Compute, Recording, Storage

SPLITS = {"train_activations": "training", "val_activations": "validation"}
stage(tuple(SPLITS), writes=("data.cache",))


@dg.multi_asset(
    specs=[
        dg.AssetSpec(key, group_name="activations", kinds={"zarr", "pytorch"},
                     description=f"Patch activations of the {split} split (zarr cache; layout in docs/formats.md).")
        for key, split in SPLITS.items()
    ],
    can_subset=True,
    pool="gpu",
    backfill_policy=dg.BackfillPolicy.single_run(),
)
def activation_caches(context: dg.AssetExecutionContext, storage: Storage, backbone: Backbone, recording: Recording,
                      compute: Compute):
    from ..core.data.ade20k import check_split, dataset_fingerprint, describe_preprocessing, list_split
    from ..core.data.cache import CACHE_FOLDER, ActivationCache
    from ..core.data.recording import cache_settings, record_split
    from ..core.store.artifacts import WriterConflict

    root = storage.dataset_root()
    selected = [(key, split) for key, split in SPLITS.items() if dg.AssetKey(key) in context.selected_asset_keys]
    # Both splits are listed and fingerprinted whatever is selected: the two caches are a pair from one dataset.
    samples = {split: list_split(root, split) for split in SPLITS.values()}
    dataset = dataset_fingerprint(samples)
    outputs = {asset: Recipe(context, storage, asset).output({
        "backbone": backbone.source, "layer": recording.layer, "crop_size": recording.crop_size,
        "dtype": recording.dtype, "preprocessing": describe_preprocessing(recording.crop_size),
        "dataset_root": str(root), "split": split, "n_images": len(samples[split]),
        "dataset_fingerprint": dataset}) for asset, split in selected}
    store, vit = storage.store, None
    if any(not out.reused for out in outputs.values()):  # a bad file of either split fails here, before recording
        for split in SPLITS.values():
            check_split(samples[split])
    for asset, split in selected:
        out = outputs[asset]
        if out.reused:
            continue
        try:
            with store.lock(out.spec, log=context.log.info):
                if store.exists(asset, out.key):
                    out.reused = True  # another run recorded it while this one waited
                    continue
                vit = vit or backbone.load(storage, compute)
                settings = cache_settings(vit, recording.layer, recording.crop_size, root, split, recording.dtype,
                                          dataset)
                context.log.info(f"{asset}: {len(samples[split])} images from {root}, {vit.info.name}, "
                                 f"layer {settings.layer}")
                with out.write(resumable=True) as work:
                    record_split(samples[split], vit, settings, work / CACHE_FOLDER,
                                 chunk_images=recording.chunk_images, log=context.log.info)
        except WriterConflict as error:
            raise dg.Failure(str(error)) from None
    for asset, _ in selected:  # published as a pair: no materialization before both are in the store
        out = outputs[asset]
        cache = ActivationCache(out.folder / CACHE_FOLDER)
        yield out.result({
            "n_images": cache.n_images,
            "n_tokens": cache.n_tokens,
            "d_model": cache.d_model,
            "backbone": str(cache.attrs["backbone"]),
            "layer": int(cache.attrs["layer"]),
            "recording_seconds": float(cache.attrs.get("seconds", 0.0)),
        })
