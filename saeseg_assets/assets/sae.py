"""`sae_weights`: a sparse autoencoder trained on `train_activations` (or imported), measured on `val_activations`.

Its folder holds sae.safetensors + sae.json (README, "SAE") and evaluation.json; the trainer state while training.
"""

import json

import dagster as dg
from pydantic import Field

from ..artifacts import artifact_metadata, checkpoint_import, input_cache
from ..config import launchpad_config
from ..core.settings import TrainConfig
from ..resources import Backbone, Checkpoints, Storage

VERSION = 1  # of the folder's format; bump when a change makes old SAEs wrong
EVALUATION_FILE = "evaluation.json"

SaeConfig = launchpad_config("SaeConfig", TrainConfig, import_path=(str, Field(
    default="", description="SAE checkpoint to import instead of training: a folder or sae.safetensors/sae.json of "
    "ours, or the reference's sae.pt. Empty means the checkpoints resource (env SAESEG_SAE_CHECKPOINT), then the drop "
    "folder data/checkpoints/sae/; where none holds a checkpoint, the SAE is trained here. Default: ''.")))


@dg.asset(deps=[dg.AssetKey("train_activations"), dg.AssetKey("val_activations")], group_name="sae",
          kinds={"pytorch", "safetensors"})
def sae_weights(context: dg.AssetExecutionContext, config: SaeConfig, storage: Storage, checkpoints: Checkpoints,
                backbone: Backbone) -> dg.MaterializeResult:
    """The sparse autoencoder on the backbone's activations: trained (resumed after a crash) or imported, and
    measured on the validation cache; reused when the same settings met the same inputs before."""
    from ..core.pictures import png_markdown, training_curve_png
    from ..core.sae import import_sae, load_sae
    from ..core.sae_eval import evaluate_sae
    from ..core.sae_training import fit_sae
    from ..core.store import Spec, write_atomic

    val_key, val = input_cache(context, storage, "val_activations")
    checkpoint, spec = checkpoint_import("sae_weights", VERSION, "sae", storage, config.import_path or checkpoints.sae,
                                         {"val_activations": val_key})
    settings = config.settings(device=config.device or backbone.device)
    if checkpoint is None:
        train_key, train = input_cache(context, storage, "train_activations")
        if train.d_model != val.d_model:
            raise ValueError(f"{train.path} holds d_model {train.d_model}, {val.path} holds {val.d_model}")
        spec = Spec("sae_weights", VERSION, settings.identity(),
                    {"train_activations": train_key, "val_activations": val_key})
    store = storage.store
    reused = store.exists("sae_weights", spec.key)
    if reused:
        context.log.info(f"reusing {store.path('sae_weights', spec.key)}: same settings and inputs")
    else:
        with store.write(spec, resumable=checkpoint is None) as work:
            if checkpoint:
                sae, _ = import_sae(checkpoint.source, work, val.d_model, val.path)
                context.log.info(f"imported the SAE from {checkpoint.source}")
            else:
                sae, _ = fit_sae(train, settings, work, log=context.log.info,
                                 log_every_steps=settings.log_every_steps, save_every_s=settings.save_every_s)
            metrics = evaluate_sae(sae, val, settings.device)
            write_atomic(work / EVALUATION_FILE, json.dumps(metrics.__dict__, indent=2).encode())
    folder = store.open("sae_weights", spec.key)
    sae, meta = load_sae(folder)
    metrics = json.loads((folder / EVALUATION_FILE).read_text())
    context.log.info(f"held-out ({metrics['n_tokens']} tokens): fvu {metrics['fvu']:.4f}  l0 {metrics['l0']:.1f}  "
                     f"dead {metrics['dead_fraction']:.3f}  dense {metrics['dense_fraction']:.3f}")
    if meta.get("restart_reason"):
        context.log.warning(f"training was redone from step 0: {meta['restart_reason']}")

    history = meta.get("history") or []
    curve = (png_markdown(training_curve_png(history), "SAE training curve") if history
             else "No training curve: the weights were imported.")
    sae_spec = sae.spec
    sparsity = ({"k": sae_spec.k} if sae_spec.architecture == "topk"
                else {"l1_coeff": float(meta["l1_coeff"]) if meta.get("l1_coeff") is not None else float("nan")})
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(spec.key, folder, reused),
            **{name: metrics[name] for name in ("fvu", "mse", "l0", "dead_fraction", "dense_fraction")},
            "eval_tokens": metrics["n_tokens"],
            "architecture": sae_spec.architecture,
            **sparsity,
            "d_model": sae_spec.d_model,
            "d_sae": sae_spec.d_sae,
            "tokens_trained": int(meta.get("tokens_trained", 0)),
            "train_seconds": float(meta.get("train_seconds", 0.0)),
            "resumed_at_step": int(meta.get("resumed_at_step", 0)),
            "restart_reason": meta.get("restart_reason") or "none",
            "imported_from": meta.get("imported_from", ""),
            "training_curve": dg.MetadataValue.md(curve),
        },
        data_version=dg.DataVersion(spec.key),
    )
