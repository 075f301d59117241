"""`sae_weights`: a sparse autoencoder trained on `train_activations` (or imported), measured on `val_activations`.

Its folder holds sae.safetensors + sae.json (docs/formats.md), evaluation.json and the same SAE in SAELens's layout
(saelens/); the trainer state while training.
"""

import dagster as dg
from pydantic import Field

from ..config import launchpad_config
from ..core.settings import TrainSettings
from ..recipe import Recipe, checkpoint_import, stage
from ..resources import Checkpoints, Compute, Storage

SaeConfig = launchpad_config("SaeConfig", TrainSettings, import_path=(str, Field(
    default="", description="SAE checkpoint to import instead of training: a folder or sae.safetensors/sae.json of "
    "ours, an SAELens folder (cfg.json + sae_weights.safetensors), or a saev sae.pt of any layout. Empty means the "
    "checkpoints resource (env SAESEG_SAE_CHECKPOINT), then the drop folder data/checkpoints/sae/; where none holds a "
    "checkpoint, the SAE is trained here. Default: ''.")), import_subtracts_b_dec=(str, Field(
    default="auto", description="Whether an imported SAE's encoder subtracts b_dec from its input: 'true', 'false', "
    "or 'auto': as the file's layout says (saev before schema 1: yes; schemas 2-5: no; SAELens: its "
    "apply_b_dec_to_input), and for saev schema 1, which both kinds of encoder wrote, the convention with the lower "
    "FVU on 16,384 training tokens (refused within 5%). Default: 'auto'.")))


@dg.asset(deps=stage("sae_weights", reads=("train_activations", "val_activations"),
                     writes=("sae.model", "sae.evaluation", "sae.saelens_export")),
          group_name="sae", kinds={"pytorch", "safetensors"}, pool="gpu",
          backfill_policy=dg.BackfillPolicy.single_run())
def sae_weights(context: dg.AssetExecutionContext, config: SaeConfig, storage: Storage, checkpoints: Checkpoints,
                compute: Compute) -> dg.MaterializeResult:
    """The sparse autoencoder on the backbone's activations: trained (resumed after a crash) or imported, and
    measured on the validation cache; reused when the same settings met the same inputs before."""
    from ..core.data.cache import check_same_dataset
    from ..core.sae.evaluation import evaluate_sae, load_evaluation, save_evaluation
    from ..core.sae.importing import import_sae
    from ..core.sae.model import load_sae
    from ..core.sae.saelens_export import FOLDER as SAELENS_FOLDER
    from ..core.sae.saelens_export import export_saelens
    from ..core.sae.training import fit_sae

    recipe = Recipe(context, storage)
    _, val = recipe.cache("val_activations")
    _, train = recipe.cache("train_activations")
    check_same_dataset(train, val)
    if train.d_model != val.d_model:
        raise ValueError(f"{train.path} holds d_model {train.d_model}, {val.path} holds {val.d_model}")
    settings = config.settings()
    with checkpoint_import(recipe, "sae", config.import_path or checkpoints.sae,
                           {"import_subtracts_b_dec": config.import_subtracts_b_dec}) as (checkpoint, out):
        out = out or recipe.output(settings.identity())
        if not out.reused:
            with out.write(resumable=checkpoint is None) as work:
                if checkpoint:
                    origin = str(checkpoint.origin or checkpoint.source)
                    sae, _ = import_sae(checkpoint.source, work, train, config.import_subtracts_b_dec,
                                        imported_from=origin, log=context.log.info)
                    context.log.info(f"imported the SAE from {origin}")
                else:
                    sae, _ = fit_sae(train, settings, work, device=compute.device, log=context.log.info)
                save_evaluation(work, evaluate_sae(sae, val, compute.device))
                provenance = {"saeseg_key": out.key, "model_name": train.attrs.get("backbone"),
                              "hook_name": f"block {train.attrs.get('layer')} output, patch tokens"}
                if reason := export_saelens(sae, work / SAELENS_FOLDER, provenance):
                    context.log.warning(f"no SAELens copy: {reason}")
    folder = out.folder
    sae, meta = load_sae(folder)
    metrics = load_evaluation(folder)
    context.log.info(f"held-out ({metrics.n_tokens} tokens): fvu {metrics.fvu:.4f}  l0 {metrics.l0:.1f}  "
                     f"dead {metrics.dead_fraction:.3f}  dense {metrics.dense_fraction:.3f}")
    if meta.get("restart_reason"):
        context.log.warning(f"training was redone from step 0: {meta['restart_reason']}")

    saelens = folder / SAELENS_FOLDER
    return out.result({
        **{name: getattr(metrics, name) for name in ("fvu", "mse", "l0", "dead_fraction", "dense_fraction")},
        "eval_tokens": metrics.n_tokens,
        **_model_metadata(sae, meta),
        "saelens_copy": (dg.MetadataValue.path(str(saelens)) if saelens.is_dir()
                         else "none: SAELens has no encoder that gives this SAE's codes"),
    })


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
