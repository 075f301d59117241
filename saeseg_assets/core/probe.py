"""The linear segmentation probe: a learning-rate x weight-decay sweep trained on one stream of the training cache,
selection on held-out training images, checkpoint I/O (ours and the reference format), evaluation over a cache."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cache import ActivationCache, Span, chunk_spans, token_batches
from .checkpoints import CheckpointError, load_tensors, read_reference_checkpoint, save_tensors
from .settings import SweepConfig
from .metrics import N_OUTPUTS, ConfusionMatrix, grid_logits, patch_predictions, pixel_predictions

STEM = "probe"


@dataclass(frozen=True)
class Probe:
    """Linear map from one patch activation to 151 logits (index = ADE mask value; 0 is never predicted)."""

    weight_CD: torch.Tensor
    bias_C: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return self.weight_CD.shape[1]

    def to(self, device: str | torch.device) -> Probe:
        return Probe(self.weight_CD.to(device), self.bias_C.to(device), self.meta)


def class_table_version() -> str:
    text = (resources.files(__package__) / "ade20k_classes.tsv").read_bytes()
    return "ade20k-150-" + hashlib.sha256(text).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_probe(folder: Path, probe: Probe) -> Path:
    """Writes probe.safetensors + probe.json atomically; returns the safetensors path."""
    meta = {"format": "saeseg-probe", "class_table_version": class_table_version(), "d_model": probe.d_model,
            **probe.meta}
    weights, _ = save_tensors(Path(folder), STEM, {"weight": probe.weight_CD.float(), "bias": probe.bias_C.float()},
                              meta)
    return weights


def load_probe(path: Path | str) -> Probe:
    """Reads our format (a folder, probe.safetensors or probe.json) or the reference format (any other file: a JSON
    line, then a torch-saved state dict of a Linear(d_model, 151), loaded weights-only: pickled code never runs)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: probe checkpoint not found")
    if path.is_dir() or path.suffix in (".safetensors", ".json"):
        tensors, meta = load_tensors(path, STEM)
        return _checked(tensors.get("weight"), tensors.get("bias"), meta, path)
    config, state = read_reference_checkpoint(path)
    weight, bias = _only_key(state, "weight", path), _only_key(state, "bias", path)
    return _checked(weight, bias, {"source": "imported", "reference_config": config}, path)


def _only_key(state: dict[str, torch.Tensor], name: str, path: Path) -> torch.Tensor | None:
    # A Linear saved alone has keys weight/bias; saved inside a module, one prefix (e.g. "probe.weight").
    matches = [k for k in state if k == name or k.endswith("." + name)]
    if len(matches) > 1:
        raise CheckpointError(f"{path}: several '{name}' tensors ({matches}); expected one Linear(d_model, 151)")
    return state[matches[0]] if matches else None


def _checked(weight: torch.Tensor | None, bias: torch.Tensor | None, meta: dict, path: Path) -> Probe:
    if weight is None or bias is None:
        raise CheckpointError(f"{path}: a probe needs tensors 'weight' [151, d_model] and 'bias' [151]")
    if weight.ndim != 2 or weight.shape[0] != N_OUTPUTS or tuple(bias.shape) != (N_OUTPUTS,):
        raise CheckpointError(f"{path}: expected weight [151, d_model] and bias [151], got weight "
                              f"{list(weight.shape)} and bias {list(bias.shape)}")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise CheckpointError(f"{path}: the probe holds NaN or infinite values")
    return Probe(weight.float().contiguous(), bias.float().contiguous(), dict(meta))


def check_d_model(probe: Probe, cache: ActivationCache, source: Path | str) -> None:
    if probe.d_model != cache.d_model:
        raise CheckpointError(f"{source}: the probe reads d_model {probe.d_model}, but the activation cache "
                              f"{cache.path} has d_model {cache.d_model} (another backbone?)")


# ---------------------------------------------------------------------------------------------------------------
# Data: a held-out slice of chunks, per-token targets for the shuffled token batches


def split_held_out(cache: ActivationCache, fraction: float, seed: int) -> tuple[list[Span], list[Span]]:
    """(train spans, held-out spans): whole chunks drawn at random, so reads stay contiguous and the held-out images
    are spread over the split (ADE20K ids are grouped by scene, so a tail slice would be biased)."""
    spans = chunk_spans(cache)
    if len(spans) < 2:
        raise ValueError(f"{cache.path}: {cache.n_images} images in {len(spans)} chunk(s); selection needs at least "
                         "two chunks (one to train on, one held out)")
    n_held = min(len(spans) - 1, max(1, round(fraction * len(spans))))
    held = set(np.random.default_rng(seed).choice(len(spans), n_held, replace=False).tolist())
    return ([s for i, s in enumerate(spans) if i not in held], [s for i, s in enumerate(spans) if i in held])


def pixel_share_targets(pixel_labels_BHW: np.ndarray, grid: int) -> np.ndarray:
    """Per token, the share of its patch's pixels carrying each label: [B * grid * grid, 151] float32, rows sum to 1.

    Column 0 (label "other") is kept here and dropped by the loss, so a patch half "other" weighs half.
    """
    b, height, width = pixel_labels_BHW.shape
    p = height // grid
    patch_of_pixel_HW = (np.arange(height)[:, None] // p) * grid + np.arange(width)[None, :] // p
    token_BHW = np.arange(b)[:, None, None] * grid * grid + patch_of_pixel_HW[None]
    pairs = token_BHW.ravel().astype(np.int64) * N_OUTPUTS + pixel_labels_BHW.ravel()
    counts = np.bincount(pairs, minlength=b * grid * grid * N_OUTPUTS).reshape(-1, N_OUTPUTS)
    return (counts / (p * p)).astype(np.float32)


def majority_targets(patch_labels_Bhw: np.ndarray) -> np.ndarray:
    labels_N = patch_labels_Bhw.reshape(-1).astype(np.int64)
    targets_NC = np.zeros((len(labels_N), N_OUTPUTS), dtype=np.float32)
    targets_NC[np.arange(len(labels_N)), labels_N] = 1.0
    return targets_NC


def target_field(config: SweepConfig, grid: int) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """The cache field the configured target comes from, and what turns its per-image arrays into targets [N, 151]."""
    if config.target == "soft":
        return "pixel_labels", lambda pixel_labels_BHW: pixel_share_targets(pixel_labels_BHW, grid)
    return "patch_labels", majority_targets


# ---------------------------------------------------------------------------------------------------------------
# The sweep


@dataclass(frozen=True)
class SweepResult:
    probe: Probe  # the selected head, with its provenance in `meta`
    table: pd.DataFrame  # one row per head: lr, weight_decay, selection_miou, selection_pixel_accuracy, train_loss
    seconds: float


def sweep_losses(W_HCD: torch.Tensor, b_HC: torch.Tensor, acts_ND: torch.Tensor,
                 targets_NC: torch.Tensor) -> torch.Tensor:
    """Per head, the pixel-weighted cross-entropy over classes 1..150: [H].

    Output 0 takes no part (it is never predicted); `targets_NC` holds pixel shares, column 0 ("other") unused.
    One matmul serves all heads: the batch is read and converted once.
    """
    logits_HNC = torch.einsum("nd,hcd->hnc", acts_ND, W_HCD[:, 1:]) + b_HC[:, None, 1:]
    targets_NC = targets_NC[:, 1:]
    return -(logits_HNC.log_softmax(dim=-1) * targets_NC).sum(dim=(1, 2)) / targets_NC.sum().clamp_min(1e-12)


def train_heads(cache: ActivationCache, spans: Sequence[Span], config: SweepConfig,
                log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trains one head per (lr, weight decay) of `config` with AdamW on the same batches of `spans`.

    Returns (W_HCD, b_HC, last epoch's mean loss per head [H]), on the config's device.
    """
    t0 = time.perf_counter()
    device = torch.device(config.device or "cpu")
    grid = config.grid
    # Zero init: the problem is convex, and equal starts make the heads differ only by lr and weight decay.
    weights = [torch.zeros(N_OUTPUTS, cache.d_model, device=device, requires_grad=True) for _ in grid]
    biases = [torch.zeros(N_OUTPUTS, device=device, requires_grad=True) for _ in grid]
    optimizer = torch.optim.AdamW([{"params": [w, b], "lr": lr, "weight_decay": wd}
                                   for (lr, wd), w, b in zip(grid, weights, biases)])
    # One stream for all epochs; each fill's last short batch is kept, so every token is seen once per epoch.
    rng = np.random.default_rng(config.seed)
    label_field, to_targets = target_field(config, cache.grid)
    loss_H = torch.full((len(grid),), math.nan)
    for epoch in range(config.epochs):
        loss_sum_H, n_batches = torch.zeros(len(grid), device=device), 0
        for batch in token_batches(cache, spans, config.batch_size, rng, buffer_images=config.buffer_images,
                                   fields=("activations", label_field), per_token={label_field: to_targets},
                                   remainder="yield"):
            acts_ND = torch.from_numpy(batch["activations"].astype(np.float32)).to(device)
            loss_H = sweep_losses(torch.stack(weights), torch.stack(biases), acts_ND,
                                  torch.from_numpy(batch[label_field]).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss_H.sum().backward()
            optimizer.step()
            loss_sum_H += loss_H.detach()
            n_batches += 1
        loss_H = (loss_sum_H / max(n_batches, 1)).cpu()
        log(f"epoch {epoch + 1}/{config.epochs}: loss {loss_H.min():.3f}..{loss_H.max():.3f} "
            f"({time.perf_counter() - t0:.1f} s)")
    return torch.stack(weights).detach(), torch.stack(biases).detach(), loss_H


def train_sweep(cache: ActivationCache, config: SweepConfig, log: Callable[[str], None] = print) -> SweepResult:
    """Trains every head on the training spans of the cache (`train_heads`), selects by held-out pixel mIoU."""
    t0 = time.perf_counter()
    device = torch.device(config.device or "cpu")
    train_spans, held_spans = split_held_out(cache, config.held_out_fraction, config.seed)
    grid = config.grid
    n_train = sum(b - a for a, b in train_spans)
    log(f"probe sweep: {len(grid)} heads, {n_train} training images, {cache.n_images - n_train} held out, "
        f"{config.epochs} epochs, target {config.target}")
    W_HCD, b_HC, loss_H = train_heads(cache, train_spans, config, log)
    evaluations = evaluate_heads(cache, W_HCD, b_HC, held_spans, device)
    table = pd.DataFrame({
        "lr": [lr for lr, _ in grid], "weight_decay": [wd for _, wd in grid],
        "selection_miou": [e.pixel.miou() for e in evaluations],
        "selection_pixel_accuracy": [e.pixel.pixel_accuracy() for e in evaluations],
        "train_loss": loss_H.tolist(),
    })
    best = int(table["selection_miou"].fillna(-1.0).to_numpy().argmax())
    table["selected"] = table.index == best
    seconds = time.perf_counter() - t0
    meta = {
        "source": "trained", "lr": grid[best][0], "weight_decay": grid[best][1],
        "selection_miou": float(table["selection_miou"][best]), "sweep": table.to_dict(orient="records"),
        "train_cache": {"fingerprint": cache.fingerprint}, "config": config.model_dump(mode="json"),
        "n_train_images": n_train, "held_out_images": [list(s) for s in held_spans], "seconds": round(seconds, 2),
    }
    log(f"selected lr {grid[best][0]:g}, weight decay {grid[best][1]:g}: held-out mIoU {meta['selection_miou']:.3f}")
    return SweepResult(Probe(W_HCD[best].cpu(), b_HC[best].cpu(), meta), table, seconds)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class Evaluation:
    pixel: ConfusionMatrix  # pixels of the crop vs bilinearly upsampled predictions
    patch: ConfusionMatrix  # patch majority labels vs per-token predictions


@torch.inference_mode()
def evaluate_heads(cache: ActivationCache, W_HCD: torch.Tensor, b_HC: torch.Tensor, spans: Sequence[Span],
                   device: torch.device | str = "cpu") -> list[Evaluation]:
    """Confusion matrices of every head over the images in `spans`; each block is read once for all heads."""
    W_HCD, b_HC = W_HCD.to(device), b_HC.to(device)
    finite_H = [bool(torch.isfinite(W_HCD[h]).all() and torch.isfinite(b_HC[h]).all()) for h in range(len(W_HCD))]
    evaluations = [Evaluation(ConfusionMatrix(device=device), ConfusionMatrix(device=device)) for _ in W_HCD]
    for a, b in spans:
        acts_BPD = torch.from_numpy(cache.read("activations", a, b)).to(device, torch.float32)
        pixel_labels_BHW = torch.from_numpy(cache.read("pixel_labels", a, b)).to(device)
        patch_labels_BP = torch.from_numpy(cache.read("patch_labels", a, b)).to(device).reshape(b - a, -1)
        logits_HBPC = torch.einsum("bpd,hcd->hbpc", acts_BPD, W_HCD) + b_HC[:, None, None]
        for h, evaluation in enumerate(evaluations):
            if not finite_H[h]:  # a diverged head keeps empty matrices: NaN scores, never selected
                continue
            pred_BHW = pixel_predictions(grid_logits(logits_HBPC[h], cache.grid), pixel_labels_BHW.shape[-1])
            evaluation.pixel.update(pred_BHW, pixel_labels_BHW)
            evaluation.patch.update(patch_predictions(logits_HBPC[h]), patch_labels_BP)
    return evaluations


def evaluate_probe(cache: ActivationCache, probe: Probe, device: torch.device | str = "cpu") -> Evaluation:
    """The probe's confusion matrices over the whole cache."""
    return evaluate_heads(cache, probe.weight_CD[None], probe.bias_C[None], chunk_spans(cache), device)[0]


BASELINE_COLUMNS = ("class_index", "class_key", "class_name", "present", "iou", "accuracy", "precision",
                    "gt_pixels", "pred_pixels", "patch_accuracy", "gt_patches", "pred_patches")


def baseline_table(evaluation: Evaluation) -> pd.DataFrame:
    """Per class present in the ground truth or predicted: pixel metrics, then patch-level accuracy and counts."""
    table = evaluation.pixel.table()
    patch = evaluation.patch
    rows = table["class_index"].to_numpy()
    table["patch_accuracy"] = patch.accuracy()[rows]
    table["gt_patches"] = patch.gt_pixels[rows].astype(int)
    table["pred_patches"] = patch.pred_pixels[rows].astype(int)
    return table[list(BASELINE_COLUMNS)]


def summary(evaluation: Evaluation) -> dict[str, float | int]:
    return {"miou": evaluation.pixel.miou(), "pixel_accuracy": evaluation.pixel.pixel_accuracy(),
            "n_classes_present": evaluation.pixel.n_present, "patch_miou": evaluation.patch.miou(),
            "patch_accuracy": evaluation.patch.pixel_accuracy()}
