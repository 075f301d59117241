"""`sae_weights`: a sparse autoencoder trained on `train_activations` (or imported), measured on `val_activations`.

Files: data/sae/sae.safetensors + sae.json (README, "SAE"), evaluation.json, and the trainer state while training.
"""

import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from ..core.sae_config import TrainConfig
from ..resources import Backbone, Checkpoints, Storage

_DEFAULT = TrainConfig()
EVALUATION_FILE = "evaluation.json"


class SaeConfig(dg.Config):
    """How to get the SAE: import a checkpoint, or train one (settings below; defaults fit the embedded demo)."""

    import_path: str = Field(default="", description="SAE checkpoint to import instead of training: a folder or "
                             "sae.safetensors/sae.json of ours, or the reference's sae.pt. Empty: the checkpoints "
                             "resource (env SAESEG_SAE_CHECKPOINT); empty too: train.")
    architecture: str = Field(default=_DEFAULT.architecture, description="'topk' (k largest pre-activations fire; "
                              "AuxK loss for dead latents) or 'relu' (the original experiment: MSE + l1 penalty).")
    expansion: int = Field(default=_DEFAULT.expansion,
                           description="Latents per model dimension: d_sae = expansion x d_model.")
    k: int = Field(default=_DEFAULT.k, description="Active latents per token (topk).")
    l1_coeff: float = Field(default=_DEFAULT.l1_coeff, description="Weight of sum|f| per token (relu), on inputs "
                            "scaled to unit variance per dimension.")
    aux_k: int = Field(default=_DEFAULT.aux_k, description="Dead latents that model the residual in the AuxK loss; "
                       "0: d_model / 2.")
    aux_coeff: float = Field(default=_DEFAULT.aux_coeff, description="Weight of the AuxK loss.")
    dead_tokens: int = Field(default=_DEFAULT.dead_tokens, description="Tokens without firing after which a latent "
                             "counts as dead for AuxK; 0: half a pass over the training cache, at most 10M.")
    lr: float = Field(default=_DEFAULT.lr, description="Adam's peak learning rate.")
    warmup_steps: int = Field(default=_DEFAULT.warmup_steps, description="Steps of linear learning-rate warm-up.")
    decay_fraction: float = Field(default=_DEFAULT.decay_fraction, description="Final share of the steps over "
                                  "which the learning rate falls linearly to 0.")
    grad_clip: float = Field(default=_DEFAULT.grad_clip, description="Clip of the global gradient norm.")
    batch_size: int = Field(default=_DEFAULT.batch_size, description="Tokens per step.")
    train_tokens: int = Field(default=_DEFAULT.train_tokens, description="Tokens to train on in all; the cache is "
                              "passed over repeatedly, shuffled anew each time.")
    seed: int = Field(default=_DEFAULT.seed, description="Seed of the initialization and the data order.")
    buffer_images: int = Field(default=_DEFAULT.buffer_images, description="Images whose tokens are mixed in the "
                               "shuffle buffer (memory: about buffer_images x patches x d_model x 2 bytes).")
    device: str = Field(default="", description="'cpu' or 'cuda'; empty: the backbone resource's device "
                        "(env SAESEG_DEVICE).")
    bf16: bool = Field(default=_DEFAULT.bf16, description="bf16 autocast for the encoder matmul (for cuda).")
    log_every_steps: int = Field(default=50, description="Steps between progress lines (tokens/s, loss, FVU, L0).")
    save_every_s: float = Field(default=60.0, description="Seconds between trainer-state saves, from which a killed "
                                "run resumes.")

    def train_config(self, device: str) -> TrainConfig:
        fields = TrainConfig.__dataclass_fields__
        return TrainConfig(**{**{name: getattr(self, name) for name in fields if name != "device"}, "device": device})


@dg.asset(deps=[dg.AssetKey("train_activations"), dg.AssetKey("val_activations")], group_name="sae",
          kinds={"pytorch", "safetensors"})
def sae_weights(context: dg.AssetExecutionContext, config: SaeConfig, storage: Storage, checkpoints: Checkpoints,
                backbone: Backbone) -> dg.MaterializeResult:
    """The sparse autoencoder on the backbone's activations: trained (reused if trained before with the same
    settings on the same cache; resumed after a crash) or imported; measured on the validation cache."""
    from ..core.cache import ActivationCache
    from ..core.checkpoints import write_atomic
    from ..core.pictures import png_markdown, training_curve_png
    from ..core.sae import import_sae
    from ..core.sae_eval import evaluate_sae
    from ..core.sae_training import fit_sae

    folder = storage.path("sae")
    val = ActivationCache(storage.cache_path("validation"))
    device = config.device or backbone.device
    from ..automation import checkpoint_to_import

    source = checkpoint_to_import("sae", storage, config.import_path or checkpoints.sae)
    if source:
        sae, meta = import_sae(Path(source).expanduser(), folder, val.d_model, val.path)
        reused = False
        context.log.info(f"imported the SAE from {source}")
    else:
        train = ActivationCache(storage.cache_path("training"))
        if train.d_model != val.d_model:
            raise ValueError(f"{train.path} holds d_model {train.d_model}, {val.path} holds {val.d_model}")
        fitted = fit_sae(train, config.train_config(device), folder, log=context.log.info,
                         log_every_steps=config.log_every_steps, save_every_s=config.save_every_s)
        sae, meta, reused = fitted.sae, fitted.meta, fitted.reused

    metrics = evaluate_sae(sae, val, device)
    evaluation = {"weights_sha256": meta["weights_sha256"], "cache": str(val.path),
                  "cache_fingerprint": val.fingerprint, **metrics.__dict__}
    write_atomic(folder / EVALUATION_FILE, json.dumps(evaluation, indent=2).encode())
    context.log.info(f"held-out ({metrics.n_tokens} tokens): fvu {metrics.fvu:.4f}  l0 {metrics.l0:.1f}  "
                     f"dead {metrics.dead_fraction:.3f}  dense {metrics.dense_fraction:.3f}")

    history = meta.get("history") or []
    curve = (png_markdown(training_curve_png(history), "SAE training curve") if history
             else "No training curve: the weights were imported.")
    spec = sae.spec
    sparsity = ({"k": spec.k} if spec.architecture == "topk"
                else {"l1_coeff": float(meta["l1_coeff"]) if meta.get("l1_coeff") is not None else float("nan")})
    return dg.MaterializeResult(
        metadata={
            "fvu": metrics.fvu,
            "mse": metrics.mse,
            "l0": metrics.l0,
            "dead_fraction": metrics.dead_fraction,
            "dense_fraction": metrics.dense_fraction,
            "eval_tokens": metrics.n_tokens,
            "architecture": spec.architecture,
            **sparsity,
            "d_model": spec.d_model,
            "d_sae": spec.d_sae,
            "tokens_trained": int(meta.get("tokens_trained", 0)),
            "train_seconds": float(meta.get("train_seconds", 0.0)),
            "reused": reused,
            "imported_from": meta.get("imported_from", ""),
            "path": dg.MetadataValue.path(str(folder / "sae.safetensors")),
            "training_curve": dg.MetadataValue.md(curve),
        },
        data_version=dg.DataVersion(meta["weights_sha256"][:16]),
    )
