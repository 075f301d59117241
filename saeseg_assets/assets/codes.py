"""`val_codes` and `tuning_codes`: the SAE's codes and the probe's logits over the validation images and over the
held-out training images, each one pass for all 150 classes."""


import dagster as dg

from ..automation import DOWNSTREAM_CONDITION
from ..recipe import artifact_metadata, input_cache, input_folder, readable
from ..resources import Backbone, Storage

VERSION = 2  # of the codes folders' formats (val_codes, tuning_codes); bump when a change makes old codes wrong

@dg.asset(deps=[dg.AssetKey("sae_weights"), dg.AssetKey("probe_checkpoint"), dg.AssetKey("val_activations")],
          group_name="suppression", kinds={"pytorch", "safetensors"}, backfill_policy=dg.BackfillPolicy.single_run(),
          pool="gpu", automation_condition=DOWNSTREAM_CONDITION)
def val_codes(context: dg.AssetExecutionContext, storage: Storage, backbone: Backbone) -> dg.MaterializeResult:
    """The SAE's codes of every validation token stored per latent (CSC), and the probe's baseline logits and pixel
    predictions: one SAE pass for all 150 classes; each class then reads only its own latents' columns."""
    from ..core.probe.model import load_probe
    from ..core.sae.model import load_sae
    from ..core.store.artifacts import Spec
    from ..core.study.codes import compute_val_codes, load_val_codes, save_val_codes

    sae_key, sae_folder = input_folder(context, storage, "sae_weights")
    probe_key, probe_folder = input_folder(context, storage, "probe_checkpoint")
    val_key, cache = input_cache(context, storage, "val_activations")
    spec = Spec("val_codes", VERSION, {},
                {"sae_weights": sae_key, "probe_checkpoint": probe_key, "val_activations": val_key})
    store = storage.store
    reused = store.exists("val_codes", spec.key)
    if not reused:
        codes = compute_val_codes(load_sae(sae_folder)[0], load_probe(probe_folder), cache, backbone.device,
                                  log=context.log.info)
        with store.write(spec) as work:
            save_val_codes(work, codes)
    folder = store.open("val_codes", spec.key)
    codes = load_val_codes(folder)
    return dg.MaterializeResult(
        metadata=readable({**artifact_metadata(spec.key, folder, reused), "n_tokens": codes.n_tokens,
                           "nonzero_codes": len(codes.values_M),
                           "codes_per_token": len(codes.values_M) / max(codes.n_tokens, 1)}),
        data_version=dg.DataVersion(spec.key),
    )


@dg.asset(deps=[dg.AssetKey("sae_weights"), dg.AssetKey("probe_checkpoint"), dg.AssetKey("train_activations")],
          group_name="suppression", kinds={"pytorch", "safetensors"}, backfill_policy=dg.BackfillPolicy.single_run(),
          pool="gpu", automation_condition=DOWNSTREAM_CONDITION)
def tuning_codes(context: dg.AssetExecutionContext, storage: Storage, backbone: Backbone) -> dg.MaterializeResult:
    """The tuning split of the suppression study: the SAE's codes and the probe's logits on the held-out training
    images (the chunks the probe sweep held out for its own selection; for an imported probe, the same draw), in the
    layout of val_codes. Tuning reads these, never validation."""
    from ..core.probe.model import load_probe
    from ..core.probe.sweep import split_held_out
    from ..core.sae.model import load_sae
    from ..core.settings import SweepConfig
    from ..core.store.artifacts import Spec
    from ..core.study.codes import compute_val_codes, load_val_codes, save_val_codes

    sae_key, sae_folder = input_folder(context, storage, "sae_weights")
    probe_key, probe_folder = input_folder(context, storage, "probe_checkpoint")
    train_key, cache = input_cache(context, storage, "train_activations")
    probe = load_probe(probe_folder)
    held, note = probe.meta.get("held_out_images"), "the chunks the probe sweep held out"
    if not held:
        default = SweepConfig()
        try:
            held, note = split_held_out(cache, default.held_out_fraction, default.seed)[1], "the probe sweep's draw"
        except ValueError:  # a cache of one chunk: nothing can be held out of it
            held, note = [(0, cache.n_images)], "all training images (one chunk: none could be held out)"
            context.log.warning(f"{cache.path} holds one chunk: tuning uses all training images, which the probe "
                                "may have been trained on (never validation)")
    spans = [tuple(int(x) for x in span) for span in held]
    spec = Spec("tuning_codes", VERSION, {"spans": [list(s) for s in spans]},
                {"sae_weights": sae_key, "probe_checkpoint": probe_key, "train_activations": train_key})
    store = storage.store
    reused = store.exists("tuning_codes", spec.key)
    if not reused:
        codes = compute_val_codes(load_sae(sae_folder)[0], probe, cache, backbone.device, log=context.log.info,
                                  spans=spans)
        with store.write(spec) as work:
            save_val_codes(work, codes)
    folder = store.open("tuning_codes", spec.key)
    codes = load_val_codes(folder)
    return dg.MaterializeResult(
        metadata=readable({**artifact_metadata(spec.key, folder, reused), "n_images": sum(b - a for a, b in spans),
                           "n_tokens": codes.n_tokens, "images": dg.MetadataValue.json([list(s) for s in spans]),
                           "which_images": note}),
        data_version=dg.DataVersion(spec.key),
    )


