"""Confusion matrices and derived metrics on numbers checkable by hand; pixel and patch predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saeseg_assets.core.probe.metrics import (
    TABLE_COLUMNS,
    ConfusionMatrix,
    candidate_classes,
    grid_logits,
    patch_predictions,
    pixel_predictions,
)


def _cm(target: list[int], pred: list[int]) -> ConfusionMatrix:
    return ConfusionMatrix().update(torch.tensor(pred), torch.tensor(target))


def test_perfect_prediction_scores_one():
    labels = torch.tensor([[1, 1, 2], [3, 3, 0]])
    cm = ConfusionMatrix().update(labels.clamp_min(1), labels)  # the 0 pixel is ignored whatever is predicted there
    assert cm.iou()[[1, 2, 3]].tolist() == [1.0, 1.0, 1.0]
    assert (cm.miou(), cm.pixel_accuracy(), cm.n_present) == (1.0, 1.0, 3)


def test_known_three_class_case():
    # Pairs (truth, pred): (1,1) x2, (1,2), (2,2) x2, (3,3) x3, (3,1); the last pixel has truth 0: ignored.
    cm = _cm(target=[1, 1, 1, 2, 2, 3, 3, 3, 3, 0], pred=[1, 1, 2, 2, 2, 3, 3, 1, 3, 5])
    assert cm.gt_pixels[1:4].tolist() == [3, 2, 4]
    assert cm.pred_pixels[1:4].tolist() == [3, 3, 3]
    assert cm.pred_pixels[5] == 0 and cm.counts[0].sum() == 0
    # IoU = TP / (gt + pred - TP): 2/4, 2/3, 3/4.
    np.testing.assert_allclose(cm.iou()[1:4], [0.5, 2 / 3, 0.75])
    np.testing.assert_allclose(cm.accuracy()[1:4], [2 / 3, 1.0, 0.75])
    np.testing.assert_allclose(cm.precision()[1:4], [2 / 3, 2 / 3, 1.0])
    assert cm.miou() == pytest.approx((0.5 + 2 / 3 + 0.75) / 3)
    assert cm.pixel_accuracy() == pytest.approx(7 / 9)


def test_class_absent_from_truth_and_prediction_is_left_out():
    cm = _cm(target=[1, 1, 2, 2], pred=[1, 2, 2, 2])
    assert math.isnan(cm.iou()[4]) and math.isnan(cm.accuracy()[4])
    assert cm.miou() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert cm.table()["class_index"].tolist() == [1, 2]


def test_class_predicted_but_absent_from_truth_is_reported_not_averaged():
    cm = _cm(target=[1, 1], pred=[1, 7])
    assert cm.iou()[7] == 0.0 and cm.precision()[7] == 0.0 and math.isnan(cm.accuracy()[7])
    assert cm.miou() == 0.5  # only class 1 (IoU 1/2) is in the ground truth; class 7's pixel already hurt it
    table = cm.table()
    assert list(table.columns) == list(TABLE_COLUMNS)
    row = table.set_index("class_index").loc[7]
    assert (bool(row["present"]), row["gt_pixels"], row["pred_pixels"], row["iou"]) == (False, 0, 1, 0.0)
    assert row["class_key"] == "007_road"


def test_updates_accumulate_like_one_big_update():
    rng = np.random.default_rng(0)
    target, pred = rng.integers(0, 151, (2, 5, 100))
    whole = ConfusionMatrix().update(torch.from_numpy(pred), torch.from_numpy(target))
    parts = ConfusionMatrix()
    for i in range(5):
        parts.update(torch.from_numpy(pred[i]), torch.from_numpy(target[i]))
    assert torch.equal(whole.counts_KK, parts.counts_KK)
    merged = ConfusionMatrix().merge(parts).merge(parts)
    assert torch.equal(merged.counts_KK, 2 * whole.counts_KK)
    assert torch.equal(ConfusionMatrix.from_counts(whole.counts).counts_KK, whole.counts_KK)
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix().update(torch.zeros(3), torch.zeros(4))


def test_empty_matrix_gives_nan_not_errors():
    cm = ConfusionMatrix()
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy()) and cm.table().empty


def test_patch_predictions_never_choose_other():
    logits_NC = torch.zeros(2, 151)
    logits_NC[:, 0] = 100.0
    logits_NC[0, 4], logits_NC[1, 150] = 1.0, 2.0
    assert patch_predictions(logits_NC).tolist() == [4, 150]


def test_pixel_predictions_upsample_bilinearly_then_argmax_over_classes():
    # A 2x2 grid: left column says class 3, right column class 5; class 0 is loudest everywhere and ignored.
    logits_BChw = torch.zeros(1, 151, 2, 2)
    logits_BChw[0, 0] = 50.0
    logits_BChw[0, 3, :, 0], logits_BChw[0, 5, :, 1] = 1.0, 1.0
    pred = pixel_predictions(logits_BChw, crop_size=4)
    assert pred[0].tolist() == [[3, 3, 5, 5]] * 4
    # Pixel column 2 samples the grid at x = 0.75: weights 1/4 (left) and 3/4 (right). Class 3 at 4 on the left
    # scores 1.0 there against class 5's 0.75, so it reaches one pixel into the right half.
    logits_BChw[0, 3, :, 0] = 4.0
    assert pixel_predictions(logits_BChw, crop_size=4)[0].tolist() == [[3, 3, 3, 5]] * 4


@pytest.mark.parametrize("peak", [0.0, 3.0, 20.0])
def test_pruned_upsampling_equals_upsampling_every_class(peak):
    torch.manual_seed(int(peak))
    logits_BChw = torch.randn(5, 151, 6, 6)
    logits_BChw[:, 20:23] += peak  # trained probes look like this: a few classes far above the rest
    full = F.interpolate(logits_BChw[:, 1:], size=(42, 42), mode="bilinear", align_corners=False).argmax(1) + 1
    assert torch.equal(pixel_predictions(logits_BChw, 42, images_per_step=2), full)
    if peak >= 20:
        assert candidate_classes(logits_BChw[:, 1:]).sum() <= 3


def test_grid_logits_keeps_row_major_patch_order():
    logits_BPC = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    grid = grid_logits(logits_BPC, 2)
    assert grid.shape == (2, 3, 2, 2)
    assert grid[1, 2, 1, 0] == logits_BPC[1, 2, 2]  # patch 2 = row 1, column 0
    with pytest.raises(ValueError, match="grid"):
        grid_logits(logits_BPC, 3)
