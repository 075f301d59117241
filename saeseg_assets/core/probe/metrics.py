"""Segmentation metrics: a confusion matrix accumulated over batches and everything derived from it.

Used alike by the probe's selection, the baseline and the suppression reports; label 0 ("other") is never scored.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

N_OUTPUTS = 151  # ADE mask values 0..150; output 0 ("other") exists so that output index = mask value
IGNORE_LABEL = 0

TABLE_COLUMNS = ("class_index", "class_key", "class_name", "present", "iou", "accuracy", "precision",
                 "gt_pixels", "pred_pixels")


class ConfusionMatrix:
    """Counts of (ground truth, prediction) pairs; rows are ground truth, columns predictions, both 0..150.

    Pairs whose ground truth is 0 are ignored on update, so row 0 stays empty; predictions never use column 0
    when they come from `pixel_predictions` or `patch_predictions`.
    """

    def __init__(self, n_classes: int = N_OUTPUTS, device: str | torch.device = "cpu"):
        self.n_classes = n_classes
        self.counts_KK = torch.zeros(n_classes, n_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> ConfusionMatrix:
        """Adds every (target, pred) pair of two equal-shaped integer tensors, except those with target 0."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        target_N = target.reshape(-1).to(self.counts_KK.device, torch.int64)
        pred_N = pred.reshape(-1).to(self.counts_KK.device, torch.int64)
        keep_N = target_N != IGNORE_LABEL
        pairs_N = target_N[keep_N] * self.n_classes + pred_N[keep_N]
        self.counts_KK += torch.bincount(pairs_N, minlength=self.n_classes**2).reshape(self.n_classes, -1)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        self.counts_KK += other.counts_KK.to(self.counts_KK.device)
        return self

    @classmethod
    def from_counts(cls, counts_KK: np.ndarray | torch.Tensor) -> ConfusionMatrix:
        counts = torch.as_tensor(np.asarray(counts_KK), dtype=torch.int64)
        cm = cls(counts.shape[0])
        cm.counts_KK = counts.clone()
        return cm

    # Everything below is derived from the counts, as float64 numpy arrays over all outputs 0..150.

    @property
    def counts(self) -> np.ndarray:
        return self.counts_KK.cpu().numpy()

    @property
    def gt_pixels(self) -> np.ndarray:
        return self.counts.sum(axis=1)

    @property
    def pred_pixels(self) -> np.ndarray:
        return self.counts.sum(axis=0)

    @property
    def true_positives(self) -> np.ndarray:
        return np.diag(self.counts)

    @property
    def present(self) -> np.ndarray:
        """Classes 1..150 that occur in the ground truth: the classes mIoU averages over."""
        present = self.gt_pixels > 0
        present[IGNORE_LABEL] = False
        return present

    def iou(self) -> np.ndarray:
        """TP / (TP + FP + FN); NaN where the class is neither in the ground truth nor predicted.

        A class predicted but absent from the ground truth gets IoU 0 here (all its pixels are false positives);
        it is left out of `miou`, whose false positives already lower the IoU of the classes those pixels belong to.
        """
        tp = self.true_positives
        union = self.gt_pixels + self.pred_pixels - tp
        return _ratio(tp, union)

    def accuracy(self) -> np.ndarray:
        """Per-class accuracy (recall): TP / ground-truth pixels; NaN for classes absent from the ground truth."""
        return _ratio(self.true_positives, self.gt_pixels)

    def precision(self) -> np.ndarray:
        """TP / predicted pixels; NaN for classes never predicted."""
        return _ratio(self.true_positives, self.pred_pixels)

    def miou(self) -> float:
        """Mean IoU over the classes present in the ground truth; NaN if none is."""
        present = self.present
        return float(self.iou()[present].mean()) if present.any() else math.nan

    def pixel_accuracy(self) -> float:
        """Share of scored pixels (ground truth not 0) predicted right."""
        total = self.counts.sum()
        return float(self.true_positives.sum() / total) if total else math.nan

    @property
    def n_present(self) -> int:
        return int(self.present.sum())

    def table(self, class_names: dict[int, tuple[str, str]] | None = None) -> pd.DataFrame:
        """One row per class 1..150 present in the ground truth or predicted (columns: TABLE_COLUMNS).

        `class_names` maps a class index to (key, name); without it the ADE20K table is used.
        """
        if class_names is None:
            from ..data.ade20k import CLASSES

            class_names = {c.index: (c.key, c.name) for c in CLASSES}
        iou, acc, prec = self.iou(), self.accuracy(), self.precision()
        gt, pred, present = self.gt_pixels, self.pred_pixels, self.present
        rows = [
            {"class_index": c, "class_key": class_names.get(c, (str(c), str(c)))[0],
             "class_name": class_names.get(c, (str(c), str(c)))[1], "present": bool(present[c]),
             "iou": iou[c], "accuracy": acc[c], "precision": prec[c], "gt_pixels": int(gt[c]),
             "pred_pixels": int(pred[c])}
            for c in range(1, self.n_classes) if gt[c] or pred[c]
        ]
        return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = num.astype(np.float64), den.astype(np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def patch_predictions(logits_NC: torch.Tensor) -> torch.Tensor:
    """Class per token: argmax over outputs 1..150 (output 0, "other", is never predicted)."""
    return logits_NC[..., 1:].argmax(dim=-1) + 1


def pixel_predictions(logits_BChw: torch.Tensor, crop_size: int, images_per_step: int = 4) -> torch.Tensor:
    """Patch-grid logits [B, 151, h, w] -> pixel classes [B, crop, crop] (int64).

    Logits are upsampled bilinearly (align_corners=False, the usual segmentation protocol) before the argmax over
    1..150. Only classes that can win somewhere are upsampled (`candidate_classes`): the result is the same as
    upsampling all 151 maps, at a fraction of the cost for a trained probe.
    """
    out = []
    for i in range(0, len(logits_BChw), images_per_step):
        logits_BChw_step = logits_BChw[i:i + images_per_step, 1:].float()
        classes_K = candidate_classes(logits_BChw_step).nonzero().squeeze(1)
        if classes_K.numel() == 0:  # only with NaN logits; let argmax see them all
            classes_K = torch.arange(logits_BChw_step.shape[1], device=logits_BChw.device)
        up_BKHW = F.interpolate(logits_BChw_step[:, classes_K], size=(crop_size, crop_size), mode="bilinear",
                                align_corners=False)
        out.append(classes_K[up_BKHW.argmax(dim=1)] + 1)
    if not out:
        return torch.zeros(0, crop_size, crop_size, dtype=torch.int64, device=logits_BChw.device)
    return torch.cat(out)


def candidate_classes(logits_BChw: torch.Tensor) -> torch.Tensor:
    """Which channels can be the argmax of the bilinear upsampling at some pixel of some image: bool [C].

    Each upsampled pixel is a convex combination of the 4 patches of one 2x2 window of the edge-padded grid, so a
    channel whose maximum over the window is below the best minimum over the window of any channel never wins there.
    """
    padded = F.pad(logits_BChw, (1, 1, 1, 1), mode="replicate")
    upper_BCuv = F.max_pool2d(padded, 2, stride=1)
    lower_Buv = (-F.max_pool2d(-padded, 2, stride=1)).amax(dim=1)
    return (upper_BCuv >= lower_Buv[:, None]).any(dim=3).any(dim=2).any(dim=0)


def grid_logits(logits_BPC: torch.Tensor, grid: int) -> torch.Tensor:
    """Token logits [B, P = grid*grid, C] (row-major patches, as in the cache) -> [B, C, grid, grid]."""
    b, p, c = logits_BPC.shape
    if p != grid * grid:
        raise ValueError(f"{p} patches do not form a {grid}x{grid} grid")
    return logits_BPC.permute(0, 2, 1).reshape(b, c, grid, grid)
