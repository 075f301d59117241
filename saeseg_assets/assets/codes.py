"""`val_codes` and `tuning_codes`: the SAE's codes and the probe's logits over the validation images and over the
held-out training images, each one pass for all 150 classes."""

import dagster as dg

from ..automation import DOWNSTREAM_CONDITION
from ..recipe import Recipe, stage
from ..resources import Compute, Storage


def _codes(context, storage: Storage, compute: Compute, cache_asset: str, held_out: bool) -> dg.MaterializeResult:
    """The codes of every image of `cache_asset`'s cache, or (`held_out`) of the training images the probe held out."""
    from ..core.probe.model import load_probe
    from ..core.probe.sweep import tuning_spans
    from ..core.sae.model import load_sae
    from ..core.study.codes import load_codes, write_codes

    recipe = Recipe(context, storage)
    _, sae_folder = recipe.folder("sae_weights")
    _, probe_folder = recipe.folder("probe_checkpoint")
    _, cache = recipe.cache(cache_asset)
    probe = load_probe(probe_folder)
    spans, which = tuning_spans(probe, cache) if held_out else (None, "all validation images")
    out = recipe.output({"spans": [list(s) for s in spans]} if held_out else {})
    if not out.reused:
        if held_out and which.startswith("all training images"):
            context.log.warning(f"{cache.path} holds one chunk: tuning uses all training images, which the probe "
                                "may have been trained on (never validation)")
        with out.write() as work:
            write_codes(work, load_sae(sae_folder)[0], probe, cache, compute.device, log=context.log.info,
                        spans=spans)
    codes = load_codes(out.folder)
    extra = {"n_images": sum(b - a for a, b in spans), "images": dg.MetadataValue.json([list(s) for s in spans])
             } if held_out else {}
    return out.result({**extra, "n_tokens": codes.n_tokens, "nonzero_codes": len(codes.values_M),
                       "codes_per_token": len(codes.values_M) / max(codes.n_tokens, 1), "which_images": which})


@dg.asset(deps=stage("val_codes", reads=("sae_weights", "probe_checkpoint", "val_activations"),
                     writes=("study.codes",)),
          group_name="suppression", kinds={"pytorch", "safetensors"}, backfill_policy=dg.BackfillPolicy.single_run(),
          pool="gpu", automation_condition=DOWNSTREAM_CONDITION)
def val_codes(context: dg.AssetExecutionContext, storage: Storage, compute: Compute) -> dg.MaterializeResult:
    """The SAE's codes of every validation token stored per latent (CSC), and the probe's baseline logits and pixel
    predictions: one SAE pass for all 150 classes; each class then reads only its own latents' columns."""
    return _codes(context, storage, compute, "val_activations", held_out=False)


@dg.asset(deps=stage("tuning_codes", reads=("sae_weights", "probe_checkpoint", "train_activations"),
                     writes=("study.codes",)),
          group_name="suppression", kinds={"pytorch", "safetensors"}, backfill_policy=dg.BackfillPolicy.single_run(),
          pool="gpu", automation_condition=DOWNSTREAM_CONDITION)
def tuning_codes(context: dg.AssetExecutionContext, storage: Storage, compute: Compute) -> dg.MaterializeResult:
    """The tuning split of the suppression study: the SAE's codes and the probe's logits on the held-out training
    images (the chunks the probe sweep held out for its own selection; for an imported probe, the same draw), in the
    layout of val_codes. Tuning reads these, never validation."""
    return _codes(context, storage, compute, "train_activations", held_out=True)
