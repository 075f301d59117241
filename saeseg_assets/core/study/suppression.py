"""The class-suppression edit x' = x + sum_i (v_i - f_i(x)) W_dec[i], taken exactly into the linear probe's logits,
its two controls, the patch and pixel measures and the class-specificity rule (the study itself: core/study.py)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..probe.metrics import N_OUTPUTS, ConfusionMatrix
from ..settings import SuppressionConfig
from .codes import ValCodes
from .logit_shift import LogitShift, PatchBaseline, PixelBaseline


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Runs the block on one torch thread. The per-class work is many small tensor ops, for which intra-op threads
    cost more in synchronisation than they save (here: 15x slower with 2 threads on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SuppressionModel:
    """What every class shares, loaded once per run: decoder rows, probe, latent maxima and frequencies, the codes
    of one set of images (validation, or the held-out training images used for tuning) and the baseline predictions
    with their margins. `pixel=False` leaves out the pixel level (tuning is measured on patches)."""

    def __init__(self, W_dec_SD: torch.Tensor, probe_W_CD: torch.Tensor, max_activation_S: np.ndarray,
                 frequency_S: np.ndarray, codes: ValCodes, patch_labels_N: torch.Tensor,
                 pixel_labels_BHW: torch.Tensor, grid: int, pixel: bool = True):
        self.W_dec_SD = W_dec_SD.float()
        self.probe_W_CD = probe_W_CD.float()
        self.max_activation_S = torch.as_tensor(np.asarray(max_activation_S), dtype=torch.float32)
        self.frequency_S = np.asarray(frequency_S, dtype=np.float64)
        self.codes = codes
        self.grid = grid
        self.pixel_labels_BHW = pixel_labels_BHW
        with single_thread():
            self.patch = PatchBaseline.build(codes.logits_NC, patch_labels_N)
            self.pixel = (PixelBaseline.build(codes.logits_NC, pixel_labels_BHW, codes.pixel_pred_BHW, grid)
                          if pixel else None)
        self.pixel_before = ConfusionMatrix.from_counts(self.pixel.counts_KK) if pixel else None
        labels_BX = pixel_labels_BHW.reshape(len(pixel_labels_BHW), -1).long()
        offsets = torch.arange(len(labels_BX))[:, None] * N_OUTPUTS
        self.pixels_BC = torch.bincount((labels_BX + offsets).reshape(-1),
                                        minlength=len(labels_BX) * N_OUTPUTS).reshape(-1, N_OUTPUTS)

    @property
    def n_tokens(self) -> int:
        return self.codes.n_tokens

    @property
    def n_images(self) -> int:
        return len(self.pixel_labels_BHW)

    def decoder_logits(self, latents: tuple[int, ...]) -> torch.Tensor:
        """P_LC = W_dec[L] W_probe^T: what one unit of each latent adds to the logits."""
        return self.W_dec_SD[list(latents)] @ self.probe_W_CD.T


@dataclass(frozen=True)
class Edit:
    """The coefficients (v_i - f_i) of one intervention: on `tokens_U` (where an edited latent fires) they are
    `coef_UL`; on every other token they are v_L in every_token mode and 0 in where_active mode."""

    latents: tuple[int, ...]
    values_L: torch.Tensor
    tokens_U: torch.Tensor
    coef_UL: torch.Tensor
    every_token: bool


def latent_edit(model: SuppressionModel, latents: tuple[int, ...], scale: float, mode: str,
                columns: tuple[torch.Tensor, torch.Tensor] | None = None) -> Edit:
    """v_L = scale x max activation; `columns` (tokens, codes) of the latents may be passed when already read."""
    values_L = scale * model.max_activation_S[list(latents)]
    tokens_U, codes_UL = columns if columns is not None else model.codes.columns(latents)
    # where_active edits exactly the tokens where some chosen latent fires: the same rows in both modes.
    return Edit(tuple(latents), values_L, tokens_U, values_L[None, :] - codes_UL, mode == "every_token")


def edit_shift(model: SuppressionModel, edit: Edit) -> LogitShift:
    """The edit in logit space: delta_n = sum_i a_ni (W_probe W_dec[i]); exact because the probe is linear."""
    if not edit.latents:
        return LogitShift.zero()
    P_LC = model.decoder_logits(edit.latents)
    shift_C = edit.values_L @ P_LC if edit.every_token else torch.zeros(N_OUTPUTS)
    return LogitShift(shift_C, edit.tokens_U, edit.coef_UL @ P_LC)


def edit_norms(model: SuppressionModel, edit: Edit) -> tuple[float, torch.Tensor]:
    """||sum_i a_ni W_dec[i]|| on the other tokens (one number) and on `tokens_U`, through the Gram matrix."""
    if not edit.latents:
        return 0.0, torch.zeros(0)
    W_LD = model.W_dec_SD[list(edit.latents)]
    G_LL = W_LD @ W_LD.T
    norms_U = torch.einsum("ul,lm,um->u", edit.coef_UL, G_LL, edit.coef_UL).clamp(min=0).sqrt()
    rest = float((edit.values_L @ G_LL @ edit.values_L).clamp(min=0).sqrt()) if edit.every_token else 0.0
    return rest, norms_U


def direction_shift(model: SuppressionModel, edit: Edit, direction_D: torch.Tensor) -> LogitShift:
    """The random-direction control: the unit direction, times the edit's own norm on each token."""
    rest, norms_U = edit_norms(model, edit)
    q_C = model.probe_W_CD @ direction_D
    return LogitShift(rest * q_C, edit.tokens_U, norms_U[:, None] * q_C[None, :])


def edited_activations(sae, x_ND: torch.Tensor, latents: tuple[int, ...], values_L: torch.Tensor,
                       mode: str) -> torch.Tensor:
    """The explicit form: encode, keep the error term x - x_hat, set the chosen codes to v, decode, add the error."""
    vals_NK, idx_NK = sae.encode(x_ND)
    error_ND = x_ND - sae.decode(vals_NK, idx_NK)
    index_L = torch.tensor(latents, dtype=torch.long, device=x_ND.device)
    chosen_NKL = idx_NK[:, :, None] == index_L
    codes_NL = (vals_NK[:, :, None] * chosen_NKL).sum(1)  # 0 where a chosen latent was not selected
    rows_N = torch.ones_like(codes_NL[:, 0], dtype=torch.bool) if mode == "every_token" else (codes_NL > 0).any(1)
    edited_NL = torch.where(rows_N[:, None], values_L.to(codes_NL.dtype), codes_NL)
    # The chosen latents leave the token's codes and come back as columns of their own, edited where the mode says.
    vals_NM = torch.cat([vals_NK.masked_fill(chosen_NKL.any(2), 0.0), edited_NL], 1)
    idx_NM = torch.cat([idx_NK, index_L.expand(len(x_ND), -1)], 1)
    return sae.decode(vals_NM, idx_NM) + error_ND


def matched_latents(frequency_S: np.ndarray, latents: tuple[int, ...], rng: np.random.Generator,
                    pool: int) -> tuple[int, ...]:
    """For each chosen latent, a different latent drawn among the `pool` nearest to it in log firing frequency."""
    log_f = np.log10(np.maximum(frequency_S, 1e-12))
    free = np.ones(len(frequency_S), dtype=bool)
    free[list(latents)] = False
    out = []
    for i in latents:
        distance = np.where(free, np.abs(log_f - log_f[i]), np.inf)
        nearest = _smallest(distance, pool)
        pick = int(rng.choice(nearest))
        out.append(pick)
        free[pick] = False
    return tuple(out)


def _smallest(distance: np.ndarray, n: int) -> np.ndarray:
    """The indices of the n smallest finite values, ties to the lower index: a stable argsort's first n, found with a
    partition (linear) rather than a sort, since it runs for every latent of every control draw."""
    n = min(n, len(distance))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    kth = np.partition(distance, n - 1)[n - 1]
    below = np.flatnonzero(distance < kth)
    below = below[np.lexsort((below, distance[below]))]
    nearest = np.concatenate([below, np.flatnonzero(distance == kth)[:n - len(below)]])
    return nearest[np.isfinite(distance[nearest])]


def random_direction(d_model: int, rng: np.random.Generator) -> torch.Tensor:
    u = rng.standard_normal(d_model)
    return torch.from_numpy(u / np.linalg.norm(u)).float()


def control_draws(model: SuppressionModel, class_index: int, latents: tuple[int, ...],
                  config: SuppressionConfig) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Per seed, (random latents, random unit direction); one stream per (seed, class, draw), so every class's
    controls are reproducible on their own."""
    draws = []
    for s in range(config.control_seeds):
        rng_latents = np.random.default_rng([config.seed, class_index, s, 0])
        rng_direction = np.random.default_rng([config.seed, class_index, s, 1])
        draws.append((matched_latents(model.frequency_S, latents, rng_latents, config.frequency_pool),
                       random_direction(model.W_dec_SD.shape[1], rng_direction)))
    return draws


# ---------------------------------------------------------------------------------------------------------------
# Measures


def patch_measures(patch: PatchBaseline, pred_N: torch.Tensor, class_index: int,
                   groups: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """Target change rate (class-c patches whose prediction changed), other change rate (other labelled patches),
    target patch accuracy (class-c patches predicted c); NaN where a group is empty. `groups`: the (target, other)
    token masks, when already made."""
    target_N, other_N = groups if groups is not None else patch_groups(patch, class_index)
    changed_N = pred_N != patch.pred_N
    return {"target_change_rate": _mean(changed_N[target_N]), "other_change_rate": _mean(changed_N[other_N]),
            "target_patch_accuracy": _mean(pred_N[target_N] == class_index)}


def patch_groups(patch: PatchBaseline, class_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens of majority label c, tokens of any other label but 0)."""
    target_N = patch.labels_N == class_index
    return target_N, (patch.labels_N != 0) & ~target_N


def pixel_measures(before: ConfusionMatrix, after: ConfusionMatrix, class_index: int) -> dict[str, float]:
    """Target IoU and accuracy, and mIoU over the other classes present in the ground truth, before and after."""
    others = before.present.copy()
    others[class_index] = False
    out = {}
    for name, cm in (("before", before), ("after", after)):
        iou = cm.iou()
        out[f"target_iou_{name}"] = float(iou[class_index])
        out[f"target_accuracy_{name}"] = float(cm.accuracy()[class_index])
        out[f"other_miou_{name}"] = float(np.mean(iou[others])) if others.any() else math.nan
    return out


def most_moved(before: ConfusionMatrix, after: ConfusionMatrix, class_index: int, n: int = 5) -> list[dict]:
    """The n other present classes whose IoU moved most (by absolute change)."""
    from ..data.ade20k import class_by_index

    iou_b, iou_a = before.iou(), after.iou()
    others = [c for c in np.flatnonzero(before.present) if c != class_index]
    others.sort(key=lambda c: (-abs(iou_a[c] - iou_b[c]), c))
    return [{"class_index": int(c), "class_key": class_by_index(int(c)).key, "iou_before": float(iou_b[c]),
             "iou_after": float(iou_a[c]), "iou_change": float(iou_a[c] - iou_b[c])} for c in others[:n]]


def is_class_specific(target: float, other: float, control_targets: list[float],
                      config: SuppressionConfig = SuppressionConfig()) -> bool:
    """target >= min_target_change, >= other_factor x other, >= control_factor x the larger control target."""
    values = [target, other, *control_targets]
    if any(not math.isfinite(v) for v in values):
        return False
    return (target >= config.min_target_change and target >= config.other_factor * other
            and target >= config.control_factor * max(control_targets, default=0.0))


def _mean(mask_or_values: torch.Tensor) -> float:
    return float(mask_or_values.float().mean()) if mask_or_values.numel() else math.nan


def example_images(model: SuppressionModel, class_index: int, n: int = 3) -> list[int]:
    """The validation images with the most class-c pixels (ties: lower index), those with none left out."""
    counts = model.pixels_BC[:, class_index]
    order = torch.argsort(-counts, stable=True)[:n]
    return [int(i) for i in order if counts[i] > 0]


def example_predictions(model: SuppressionModel, shift: LogitShift, images: list[int], crop: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel predictions (before, after) [n, crop, crop] of a few images, through metrics.pixel_predictions."""
    from ..probe.metrics import grid_logits, pixel_predictions

    P = model.grid * model.grid
    tokens = (torch.cat([torch.arange(i * P, (i + 1) * P) for i in images]) if images
              else torch.zeros(0, dtype=torch.long))
    logits_TC = model.codes.logits_NC[tokens] + shift.dense(tokens)
    after = pixel_predictions(grid_logits(logits_TC.reshape(len(images), P, -1), model.grid), crop)
    return model.codes.pixel_pred_BHW[images].long(), after


def load_model(sae_folder, probe_folder, stats_folder, codes_folder, cache, pixel: bool = True) -> SuppressionModel:
    """Reads the shared inputs once: decoder rows, probe, latent maxima and frequencies, the codes of one set of
    images (all of `cache`, or the spans the codes were computed on) and their labels."""
    from ..probe.model import load_probe
    from ..sae.model import load_sae
    from .codes import load_val_codes
    from .latent_stats import load_latent_stats

    sae, _ = load_sae(sae_folder)
    probe = load_probe(probe_folder)
    stats = load_latent_stats(stats_folder)
    codes = load_val_codes(codes_folder)
    spans = [tuple(span) for span in codes.meta.get("cache", {}).get("spans") or [(0, cache.n_images)]]
    n_images = sum(b - a for a, b in spans)
    # Which SAE each input was made from is the caller's to check (the store's manifests); this catches a mix-up.
    if codes.n_tokens != n_images * cache.n_patches or stats.d_sae != sae.spec.d_sae or codes.d_sae != sae.spec.d_sae:
        raise ValueError(f"{codes_folder} / {stats_folder} do not match the SAE in {sae_folder} and the cache "
                         f"{cache.path}: materialize latent_stats and the codes again")
    labels_N = torch.from_numpy(np.concatenate([cache.read("patch_labels", a, b) for a, b in spans])).reshape(-1)
    pixels_BHW = torch.from_numpy(np.concatenate([cache.read("pixel_labels", a, b) for a, b in spans]))
    return SuppressionModel(sae.W_dec_SD.detach(), probe.weight_CD, stats.act_max_S, stats.frequency_S, codes,
                            labels_N, pixels_BHW, cache.grid, pixel)
