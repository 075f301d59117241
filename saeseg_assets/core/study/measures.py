"""What the study measures, as numbers: shares and means, bootstrap intervals over images, the TPP score, pixel IoU
and accuracy before and after an edit, the classes it moved most, and the class-specificity verdict."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..probe.metrics import N_OUTPUTS, ConfusionMatrix
from ..report.results import Interval, MovedClass, PixelFigures
from ..settings import SuppressionSettings
from .logit_shift import ImageCounts


def ratio(num, den) -> float:
    """num / den, NaN where den is 0."""
    return float(num) / float(den) if den else math.nan


def mean(values) -> float:
    """The mean of the finite values, NaN where there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap over images


def bootstrap_weights(n_images: int, resamples: int, seed) -> np.ndarray:
    """How often each image is drawn in each resample (with replacement): [resamples, n_images]."""
    draws = np.random.default_rng(seed).integers(0, n_images, (resamples, n_images))
    flat = (draws + np.arange(resamples)[:, None] * n_images).ravel()
    return np.bincount(flat, minlength=resamples * n_images).reshape(resamples, n_images)


def interval(values_R: np.ndarray, level: float = 0.95) -> Interval:
    """The percentile interval of resampled statistics (resamples where it is undefined left out)."""
    values_R = values_R[np.isfinite(values_R)]
    if not len(values_R):
        return Interval(math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    return Interval(float(np.percentile(values_R, tail)), float(np.percentile(values_R, 100 - tail)))


def ratio_interval(weights_RB: np.ndarray, num_B: np.ndarray, den_B: np.ndarray) -> Interval:
    """95% interval of sum(num) / sum(den) over resamples of the images."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return interval((weights_RB @ num_B) / (weights_RB @ den_B))


def iou_change_interval(weights_RB: np.ndarray, before: ImageCounts, after: ImageCounts) -> Interval:
    """95% interval of the class's IoU after minus before, both computed on each resample of the images."""
    def iou(counts: ImageCounts) -> np.ndarray:
        tp, pred, gt = (weights_RB @ x.numpy().astype(np.float64) for x in (counts.tp_B, counts.pred_B, before.gt_B))
        return tp / (gt + pred - tp)

    with np.errstate(invalid="ignore", divide="ignore"):
        return interval(iou(after) - iou(before))


# ---------------------------------------------------------------------------------------------------------------
# Patch and pixel measures


def patch_accuracies(labels_N: torch.Tensor, pred_N: torch.Tensor) -> np.ndarray:
    """Per class, the share of its patches predicted as it (NaN for classes without patches): [151]."""
    total = torch.bincount(labels_N, minlength=N_OUTPUTS).double()
    correct = torch.bincount(labels_N[pred_N == labels_N], minlength=N_OUTPUTS).double()
    return torch.where(total > 0, correct / total.clamp(min=1), torch.nan).numpy()


def tpp_score(labels_N: torch.Tensor, pred_before_N: torch.Tensor, pred_after_N: torch.Tensor,
              class_index: int) -> float:
    """SAEBench's targeted probe perturbation per patch: the drop of class c's patch accuracy minus the mean drop of
    the other present classes' patch accuracy (label 0 never counts)."""
    drop_C = patch_accuracies(labels_N, pred_before_N) - patch_accuracies(labels_N, pred_after_N)
    others = [k for k in range(1, N_OUTPUTS) if k != class_index and not math.isnan(drop_C[k])]
    if math.isnan(drop_C[class_index]):
        return math.nan
    return float(drop_C[class_index] - (np.mean(drop_C[others]) if others else 0.0))


def pixel_measures(before: ConfusionMatrix, after: ConfusionMatrix, class_index: int,
                   iou_change_ci: Interval) -> PixelFigures:
    """Target IoU and accuracy, and mIoU over the other classes present in the ground truth, before and after."""
    others = before.present.copy()
    others[class_index] = False
    iou_before, iou_after = before.iou(), after.iou()

    def other_miou(iou: np.ndarray) -> float:
        return float(np.mean(iou[others])) if others.any() else math.nan

    target_before, target_after = float(iou_before[class_index]), float(iou_after[class_index])
    return PixelFigures(target_before, target_after, target_after - target_before, iou_change_ci,
                        float(before.accuracy()[class_index]), float(after.accuracy()[class_index]),
                        other_miou(iou_before), other_miou(iou_after))


def most_moved(before: ConfusionMatrix, after: ConfusionMatrix, class_index: int,
               n: int = 5) -> tuple[MovedClass, ...]:
    """The n other present classes whose IoU moved most (by absolute change)."""
    from ..data.ade20k import class_by_index

    iou_b, iou_a = before.iou(), after.iou()
    others = [c for c in np.flatnonzero(before.present) if c != class_index]
    others.sort(key=lambda c: (-abs(iou_a[c] - iou_b[c]), c))
    return tuple(MovedClass(int(c), class_by_index(int(c)).key, float(iou_b[c]), float(iou_a[c]),
                            float(iou_a[c] - iou_b[c])) for c in others[:n])


UNMET = ("target", "other", "control", "undefined")  # the specificity rule's criteria, in the order they are checked


def unmet_criterion(target: float, other: float, control_targets: list[float],
                    config: SuppressionSettings = SuppressionSettings()) -> str:
    """The first criterion of the specificity rule a setting fails ("" if it is class-specific): "undefined" (a
    rate is NaN), "target" (target < min_target_change), "other" (target < other_factor x other) or "control"
    (target < control_factor x the larger control target)."""
    values = [target, other, *control_targets]
    if any(not math.isfinite(v) for v in values):
        return "undefined"
    if target < config.min_target_change:
        return "target"
    if target < config.other_factor * other:
        return "other"
    if target < config.control_factor * max(control_targets, default=0.0):
        return "control"
    return ""


def is_class_specific(target: float, other: float, control_targets: list[float],
                      config: SuppressionSettings = SuppressionSettings()) -> bool:
    """target >= min_target_change, >= other_factor x other, >= control_factor x the larger control target."""
    return unmet_criterion(target, other, control_targets, config) == ""


def specific_per_resample(weights_RB: np.ndarray, target_B, changed_target_B, other_B, changed_other_B,
                          controls_changed_target_B: list[list], config: SuppressionSettings) -> np.ndarray:
    """The verdict of one setting on each resample of the images ([resamples] bool): the rule applied to the
    resample's target and other change rates and each control's largest draw, as `is_class_specific` does once."""
    def rate(num_B, den_B) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (weights_RB @ np.asarray(num_B, np.float64)) / (weights_RB @ np.asarray(den_B, np.float64))

    target_R, other_R = rate(changed_target_B, target_B), rate(changed_other_B, other_B)
    controls_R = np.zeros_like(target_R)
    finite_R = np.isfinite(target_R) & np.isfinite(other_R)
    for seeds in controls_changed_target_B:
        largest_R = np.max([rate(c, target_B) for c in seeds], axis=0)
        finite_R &= np.isfinite(largest_R)
        controls_R = np.fmax(controls_R, largest_R)
    return (finite_R & (target_R >= config.min_target_change) & (target_R >= config.other_factor * other_R)
            & (target_R >= config.control_factor * controls_R))
