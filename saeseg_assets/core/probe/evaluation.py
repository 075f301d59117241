"""The probe over a cache: patch and pixel predictions accumulated into a confusion matrix, and the baseline table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..data.cache import ActivationCache, Span, chunk_spans
from ..store.artifacts import write_atomic
from .metrics import ConfusionMatrix, grid_logits, patch_predictions, pixel_predictions
from .model import Probe, probe_field


@dataclass(frozen=True)
class Evaluation:
    pixel: ConfusionMatrix  # pixels of the crop vs bilinearly upsampled predictions
    patch: ConfusionMatrix  # patch majority labels vs per-token predictions


@torch.inference_mode()
def evaluate_heads(cache: ActivationCache, W_HCD: torch.Tensor, b_HC: torch.Tensor, spans: Sequence[Span],
                   device: torch.device | str = "cpu", field: str = "activations") -> list[Evaluation]:
    """Confusion matrices of every head over the images in `spans` (their tokens from the cache array `field`);
    each block is read once for all heads."""
    W_HCD, b_HC = W_HCD.to(device), b_HC.to(device)
    finite_H = [bool(torch.isfinite(W_HCD[h]).all() and torch.isfinite(b_HC[h]).all()) for h in range(len(W_HCD))]
    evaluations = [Evaluation(ConfusionMatrix(device=device), ConfusionMatrix(device=device)) for _ in W_HCD]
    for a, b in spans:
        acts_BPD = torch.from_numpy(cache.read(field, a, b)).to(device, torch.float32)
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
    """The probe's confusion matrices over the whole cache, on the tokens it reads (`probe_layer` in its meta)."""
    return evaluate_heads(cache, probe.weight_CD[None], probe.bias_C[None], chunk_spans(cache), device,
                          probe_field(probe.layer))[0]


FORMAT_VERSION = 1  # of baseline_metrics.csv and baseline_metrics.json
BASELINE_TABLE = "baseline_metrics.csv"
BASELINE_SUMMARY = "baseline_metrics.json"
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


def save_baseline(folder: Path, evaluation: Evaluation) -> None:
    """baseline_metrics.csv (`BASELINE_COLUMNS`, one row per class present or predicted) and baseline_metrics.json
    (the `summary` figures)."""
    write_atomic(Path(folder) / BASELINE_TABLE, baseline_table(evaluation).to_csv(index=False).encode())
    write_atomic(Path(folder) / BASELINE_SUMMARY, json.dumps(summary(evaluation), indent=2).encode())


def load_baseline(folder: Path) -> tuple[pd.DataFrame, dict]:
    """(per-class table, overall figures) as `save_baseline` wrote them."""
    return pd.read_csv(Path(folder) / BASELINE_TABLE), json.loads((Path(folder) / BASELINE_SUMMARY).read_text())
