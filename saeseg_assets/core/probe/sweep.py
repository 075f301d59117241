"""Training the probe: a learning-rate x weight-decay sweep on one stream of the training cache, every head on the
same batches, and selection by pixel mIoU on held-out training chunks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..data.cache import ActivationCache, Span, chunk_spans, token_batches
from ..settings import SweepSettings
from .evaluation import evaluate_heads
from .metrics import (
    N_OUTPUTS,
)
from .model import Probe, probe_field


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


def target_field(config: SweepSettings, grid: int) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
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


def train_heads(cache: ActivationCache, spans: Sequence[Span], config: SweepSettings, device: str = "cpu",
                log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trains one head per (lr, weight decay) of `config` with AdamW on the same batches of `spans`.

    Returns (W_HCD, b_HC, last epoch's mean loss per head [H]), on `device`.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    grid = config.grid
    # Zero init: the problem is convex, and equal starts make the heads differ only by lr and weight decay.
    weights = [torch.zeros(N_OUTPUTS, cache.d_model, device=device, requires_grad=True) for _ in grid]
    biases = [torch.zeros(N_OUTPUTS, device=device, requires_grad=True) for _ in grid]
    optimizer = torch.optim.AdamW([{"params": [w, b], "lr": lr, "weight_decay": wd}
                                   for (lr, wd), w, b in zip(grid, weights, biases)])
    # One stream for all epochs; each fill's last short batch is kept, so every token is seen once per epoch.
    rng = np.random.default_rng(config.seed)
    label_field, to_targets = target_field(config, cache.grid)
    acts_field = probe_field(config.probe_layer)
    loss_H = torch.full((len(grid),), math.nan)
    for epoch in range(config.epochs):
        loss_sum_H, n_batches = torch.zeros(len(grid), device=device), 0
        for batch in token_batches(cache, spans, config.batch_size, rng, buffer_images=config.buffer_images,
                                   fields=(acts_field, label_field), per_token={label_field: to_targets},
                                   remainder="yield"):
            acts_ND = torch.from_numpy(batch[acts_field].astype(np.float32)).to(device)
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


def train_sweep(cache: ActivationCache, config: SweepSettings, device: str = "cpu",
                log: Callable[[str], None] = print) -> SweepResult:
    """Trains every head on the training spans of the cache (`train_heads`), selects by held-out pixel mIoU."""
    t0 = time.perf_counter()
    device = torch.device(device)
    train_spans, held_spans = split_held_out(cache, config.held_out_fraction, config.seed)
    grid = config.grid
    n_train = sum(b - a for a, b in train_spans)
    log(f"probe sweep: {len(grid)} heads, {n_train} training images, {cache.n_images - n_train} held out, "
        f"{config.epochs} epochs, target {config.target}")
    W_HCD, b_HC, loss_H = train_heads(cache, train_spans, config, device, log)
    evaluations = evaluate_heads(cache, W_HCD, b_HC, held_spans, device, probe_field(config.probe_layer))
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
        "source": "trained", "probe_layer": config.probe_layer, "lr": grid[best][0], "weight_decay": grid[best][1],
        "selection_miou": float(table["selection_miou"][best]), "sweep": table.to_dict(orient="records"),
        "train_cache": {"fingerprint": cache.fingerprint}, "config": config.model_dump(mode="json"),
        "n_train_images": n_train, "held_out_images": [list(s) for s in held_spans], "seconds": round(seconds, 2),
    }
    log(f"selected lr {grid[best][0]:g}, weight decay {grid[best][1]:g}: held-out mIoU {meta['selection_miou']:.3f}")
    return SweepResult(Probe(W_HCD[best].cpu(), b_HC[best].cpu(), meta), table, seconds)


def tuning_spans(probe: Probe, cache: ActivationCache) -> tuple[list[Span], str]:
    """The training images the suppression study tunes on, and which they are in words: the chunks the probe's sweep
    held out for its own selection; for a probe trained elsewhere, the draw a default sweep would hold out; for a
    cache of one chunk, all of it (nothing can be held out; the probe may have been trained on it)."""
    if held := probe.meta.get("held_out_images"):
        return [(int(a), int(b)) for a, b in held], "the chunks the probe sweep held out"
    default = SweepSettings()
    try:
        return split_held_out(cache, default.held_out_fraction, default.seed)[1], "the probe sweep's draw"
    except ValueError:
        return [(0, cache.n_images)], "all training images (one chunk: none could be held out)"
