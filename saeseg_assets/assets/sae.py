"""`sae_weights`: a sparse autoencoder trained on `train_activations` (or imported), measured on `val_activations`.

Its folder holds sae.safetensors + sae.json (README, "SAE"), evaluation.json and the same SAE in SAELens's layout
(saelens/); the trainer state while training.
"""

import json

import dagster as dg
from pydantic import Field

from ..config import launchpad_config
from ..core.settings import TrainConfig
from ..recipe import (
    artifact_metadata,
    check_same_dataset,
    checkpoint_import,
    input_cache,
    readable,
)
from ..resources import Backbone, Checkpoints, Storage

# Of the folder's format; bump when a change makes old SAEs wrong. 2: the SAELens copy beside ours; an import's key
# holds the b_dec setting and the training cache (on which an undecided b_dec convention is measured).
VERSION = 2
EVALUATION_FILE = "evaluation.json"

SaeConfig = launchpad_config("SaeConfig", TrainConfig, import_path=(str, Field(
    default="", description="SAE checkpoint to import instead of training: a folder or sae.safetensors/sae.json of "
    "ours, an SAELens folder (cfg.json + sae_weights.safetensors), or a saev sae.pt of any layout. Empty means the "
    "checkpoints resource (env SAESEG_SAE_CHECKPOINT), then the drop folder data/checkpoints/sae/; where none holds a "
    "checkpoint, the SAE is trained here. Default: ''.")), import_subtracts_b_dec=(str, Field(
    default="auto", description="Whether an imported SAE's encoder subtracts b_dec from its input: 'true', 'false', "
    "or 'auto': as the file's layout says (saev before schema 1: yes; schemas 2-5: no; SAELens: its "
    "apply_b_dec_to_input), and for saev schema 1, which both kinds of encoder wrote, the convention with the lower "
    "FVU on 16,384 training tokens (refused within 5%). Default: 'auto'.")))


@dg.asset(deps=[dg.AssetKey("train_activations"), dg.AssetKey("val_activations")], group_name="sae",
          kinds={"pytorch", "safetensors"}, pool="gpu", backfill_policy=dg.BackfillPolicy.single_run())
def sae_weights(context: dg.AssetExecutionContext, config: SaeConfig, storage: Storage, checkpoints: Checkpoints,
                backbone: Backbone) -> dg.MaterializeResult:
    """The sparse autoencoder on the backbone's activations: trained (resumed after a crash) or imported, and
    measured on the validation cache; reused when the same settings met the same inputs before."""
    from ..core.sae.evaluation import evaluate_sae
    from ..core.sae.importing import import_sae
    from ..core.sae.model import load_sae
    from ..core.sae.saelens_export import FOLDER as SAELENS_FOLDER
    from ..core.sae.saelens_export import export_saelens
    from ..core.sae.training import fit_sae
    from ..core.store.artifacts import Spec, write_atomic

    val_key, val = input_cache(context, storage, "val_activations")
    train_key, train = input_cache(context, storage, "train_activations")
    check_same_dataset(storage, train_key, val_key)
    if train.d_model != val.d_model:
        raise ValueError(f"{train.path} holds d_model {train.d_model}, {val.path} holds {val.d_model}")
    inputs = {"train_activations": train_key, "val_activations": val_key}
    settings = config.settings(device=config.device or backbone.device)
    store = storage.store
    with checkpoint_import(context, "sae_weights", VERSION, "sae", storage, config.import_path or checkpoints.sae,
                           inputs, {"import_subtracts_b_dec": config.import_subtracts_b_dec}) as (checkpoint, spec):
        spec = spec or Spec("sae_weights", VERSION, settings.identity(), inputs)
        reused = store.exists("sae_weights", spec.key)
        if reused:
            context.log.info(f"reusing {store.path('sae_weights', spec.key)}: same settings and inputs")
        else:
            with store.write(spec, resumable=checkpoint is None) as work:
                if checkpoint:
                    origin = str(checkpoint.origin or checkpoint.source)
                    sae, _ = import_sae(checkpoint.source, work, train, config.import_subtracts_b_dec,
                                        imported_from=origin, log=context.log.info)
                    context.log.info(f"imported the SAE from {origin}")
                else:
                    sae, _ = fit_sae(train, settings, work, log=context.log.info,
                                     log_every_steps=settings.log_every_steps, save_every_s=settings.save_every_s)
                metrics = evaluate_sae(sae, val, settings.device)
                write_atomic(work / EVALUATION_FILE, json.dumps(metrics.__dict__, indent=2).encode())
                provenance = {"saeseg_key": spec.key, "model_name": train.attrs.get("backbone"),
                              "hook_name": f"block {train.attrs.get('layer')} output, patch tokens"}
                if reason := export_saelens(sae, work / SAELENS_FOLDER, provenance):
                    context.log.warning(f"no SAELens copy: {reason}")
    folder = store.open("sae_weights", spec.key)
    sae, meta = load_sae(folder)
    metrics = json.loads((folder / EVALUATION_FILE).read_text())
    context.log.info(f"held-out ({metrics['n_tokens']} tokens): fvu {metrics['fvu']:.4f}  l0 {metrics['l0']:.1f}  "
                     f"dead {metrics['dead_fraction']:.3f}  dense {metrics['dense_fraction']:.3f}")
    if meta.get("restart_reason"):
        context.log.warning(f"training was redone from step 0: {meta['restart_reason']}")

    saelens = folder / SAELENS_FOLDER
    return dg.MaterializeResult(
        metadata=readable({
            **artifact_metadata(spec.key, folder, reused),
            **{name: metrics[name] for name in ("fvu", "mse", "l0", "dead_fraction", "dense_fraction")},
            "eval_tokens": metrics["n_tokens"],
            **_model_metadata(sae, meta),
            "saelens_copy": (dg.MetadataValue.path(str(saelens)) if saelens.is_dir()
                             else "none: SAELens has no encoder that gives this SAE's codes"),
        }),
        data_version=dg.DataVersion(spec.key),
    )


def _model_metadata(sae, meta: dict) -> dict:
    """What the SAE is (architecture, sparsity, sizes, encoder convention) and where it came from (training figures
    and curve, or what the import read and decided)."""
    from ..core.report.pictures import png_markdown, training_curve_png

    spec = sae.spec
    history = meta.get("history") or []
    curve = (png_markdown(training_curve_png(history), "SAE training curve") if history
             else "No training curve: the weights were imported.")
    sparsity = {"k": spec.k} if spec.k else {}
    if spec.architecture == "relu":
        sparsity["l1_coeff"] = float(meta["l1_coeff"]) if meta.get("l1_coeff") is not None else float("nan")
    if spec.architecture in ("batchtopk", "jumprelu"):
        sparsity["mean_threshold"] = float(sae.threshold_S.mean())
    imported = meta.get("import") or {}
    return {
        "architecture": spec.architecture,
        **sparsity,
        "d_model": spec.d_model,
        "d_sae": spec.d_sae,
        "encoder_subtracts_b_dec": spec.subtracts_b_dec,
        "tokens_trained": int(meta.get("tokens_trained", 0)),
        "train_seconds": float(meta.get("train_seconds", 0.0)),
        "resumed_at_step": int(meta.get("resumed_at_step", 0)),
        "restart_reason": meta.get("restart_reason") or "none",
        "imported_from": meta.get("imported_from", ""),
        **{f"import_{name}": value for name, value in imported.items()},
        "training_curve": dg.MetadataValue.md(curve),
    }
