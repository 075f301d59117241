"""The suppression core on hand-made SAEs and probes: the formula, the logit shortcut, the exact fast evaluation,
controls, the class-specificity rule, absent classes and the report files."""

from __future__ import annotations

import math

import numpy as np
import torch

from saeseg_assets.core.data.cache import ActivationCache, CacheProvenance, CacheWriter
from saeseg_assets.core.probe.metrics import (
    ConfusionMatrix,
    grid_logits,
    patch_predictions,
    pixel_predictions,
)
from saeseg_assets.core.probe.model import Probe
from saeseg_assets.core.report.records import json_safe
from saeseg_assets.core.report.results import DoseRow, Interval, Selection, Setting, SweepRow
from saeseg_assets.core.report.summary import oracle, setting_counts
from saeseg_assets.core.sae.model import Sae, SaeSpec
from saeseg_assets.core.settings import MODES, SuppressionSettings
from saeseg_assets.core.study.class_study import study_class
from saeseg_assets.core.study.codes import load_codes, write_codes
from saeseg_assets.core.study.controls import control_draws, matched_latents, smallest
from saeseg_assets.core.study.edit import LatentEffect, edited_activations
from saeseg_assets.core.study.examples import validation_crops
from saeseg_assets.core.study import logit_shift
from saeseg_assets.core.study.logit_shift import (
    ImageCounts,
    LogitShift,
    PatchBaseline,
    PixelBaseline,
    RayExit,
    RowTerm,
)
from saeseg_assets.core.study.patches import ClassPatches
from saeseg_assets.core.study.measures import is_class_specific
from saeseg_assets.core.study.model import SuppressionModel

QUIET = dict(log=lambda _: None)


def codes_of(folder, sae, probe, cache, **options):
    """The codes as val_codes writes them to `folder` and the study reads them back."""
    write_codes(folder, sae, probe, cache, **QUIET, **options)
    return load_codes(folder)


def write_val_cache(path, acts_BPD, labels_Bhw, patch_size=2) -> ActivationCache:
    n, p, d = acts_BPD.shape
    grid = int(round(p ** 0.5))
    settings = CacheProvenance(backbone="toy", backbone_source="toy", layer=0, crop_size=patch_size * grid,
                             patch_size=patch_size, d_model=d, dataset_root="/nowhere", split="validation",
                             preprocessing="none", dtype="float32")
    writer = CacheWriter(path, settings, [f"val{i}" for i in range(n)], chunk_images=n)
    pixels = np.repeat(np.repeat(labels_Bhw, patch_size, 1), patch_size, 2)
    writer.write_chunk(0, acts_BPD.astype(np.float32), labels_Bhw, np.ones(labels_Bhw.shape, np.float32), pixels)
    return ActivationCache(writer.finish())


def basis_sae() -> Sae:
    """ReLU SAE on 4 dims: latents 0..3 are the basis directions (threshold 0.1), latents 4, 5 never fire."""
    sae = Sae(SaeSpec("relu", 4, 6))
    W = torch.zeros(6, 4)
    W[:4] = torch.eye(4)
    W[4:] = torch.nn.functional.normalize(torch.ones(2, 4), dim=1)
    with torch.no_grad():
        sae.W_dec_SD.copy_(W)
        sae.W_enc_SD.copy_(W)
        sae.b_enc_S.copy_(torch.tensor([-0.1, -0.1, -0.1, -0.1, -100.0, -100.0]))
    return sae


def tiny_world(tmp_path):
    """3 images of 2x2 patches. Class 10 (grass) tokens are 3 e0, class 3 tokens 3 e1, class 21 tokens 3 e2, wall (1)
    tokens 0. The probe reads grass from e0, class 3 from e1, class 21 from e2, and says wall (bias 0.5) otherwise."""
    labels = np.array([[[10, 10], [10, 10]], [[3, 3], [1, 1]], [[21, 1], [21, 1]]], dtype=np.uint8)
    slot = {10: 0, 3: 1, 21: 2}
    acts = np.zeros((3, 4, 4), dtype=np.float32)
    for b in range(3):
        for p, label in enumerate(labels[b].reshape(-1)):
            if label in slot:
                acts[b, p, slot[label]] = 3.0
    cache = write_val_cache(tmp_path / "val.zarr", acts, labels)
    sae = basis_sae()
    weight, bias = torch.zeros(151, 4), torch.zeros(151)
    for label, j in slot.items():
        weight[label, j] = 1.0
    bias[1] = 0.5
    probe = Probe(weight, bias)
    codes = codes_of(tmp_path / "codes", sae, probe, cache)
    max_act = np.array([2.9, 2.9, 2.9, 0.0, 0.0, 0.0])
    freq = np.array([0.33, 0.17, 0.17, 0.0, 0.0, 0.0])
    pixels = torch.from_numpy(cache.read("pixel_labels", 0, 3))
    model = SuppressionModel(sae.W_dec_SD.detach(), weight, max_act, freq, codes,
                                torch.from_numpy(labels).reshape(-1), pixels, cache.grid)
    return sae, probe, cache, model


def test_baseline_of_the_tiny_world(tmp_path):
    _, _, _, model = tiny_world(tmp_path)
    assert model.patch.pred_N.tolist() == [10, 10, 10, 10, 3, 3, 1, 1, 21, 1, 21, 1]
    assert model.pixel_before.iou()[10] == 1.0


def test_a_latent_that_never_fires_with_scale_zero_changes_nothing(tmp_path):
    _, _, _, model = tiny_world(tmp_path)
    shift = LatentEffect(model, (5,)).shift(0.0, "every_token")
    assert not shift.shift_C.any() and len(shift.rows_M) == 0
    assert torch.equal(model.patch.predictions_after(shift), model.patch.pred_N)
    assert torch.equal(model.pixel.counts_after(model.patch, shift), model.pixel.counts_KK)
    m = study(model, 10, (5,), SuppressionSettings(scale=0.0, control_seeds=2)).configured
    assert m.patch.target_change_rate == 0.0 and m.patch.other_change_rate == 0.0
    assert m.pixels.target_iou_after == m.pixels.target_iou_before == 1.0 and m.pixels.target_iou_change == 0.0


def test_suppressing_the_latent_the_probe_reads_flips_exactly_its_patches(tmp_path):
    _, _, _, model = tiny_world(tmp_path)
    # Ablation: grass tokens keep only the error term 0.1 e0, whose grass logit 0.1 loses to the wall bias 0.5.
    shift = LatentEffect(model, (0,)).shift(0.0, "every_token")
    after = model.patch.predictions_after(shift)
    changed = (after != model.patch.pred_N).nonzero().squeeze(1).tolist()
    fires = model.codes.column(0)[0].tolist()
    assert changed == fires == [0, 1, 2, 3]
    assert after[:4].tolist() == [1, 1, 1, 1]
    counts = ConfusionMatrix.from_counts(model.pixel.counts_after(model.patch, shift))
    assert counts.iou()[10] == 0.0 and counts.accuracy()[3] == 1.0
    # At scale -2 every token gets -5.8 e0: only grass can lose, so the effect stays on grass.
    m = study(model, 10, (0,), SuppressionSettings(control_seeds=2)).configured
    assert (m.patch.target_change_rate, m.patch.other_change_rate, m.patch.target_patch_accuracy) == (1.0, 0.0, 0.0)
    assert (m.pixels.target_iou_before, m.pixels.target_iou_after, m.pixels.target_accuracy_after) == (1.0, 0.0, 0.0)
    # v = -2 x the latent's largest training activation, 2.9.
    assert m.latents == (0,) and abs(m.values[0] + 5.8) < 1e-6 and m.setting == Setting("f1", 1, "every_token", -2.0)
    # Former grass pixels are now called wall: only wall's IoU moves among the other classes.
    moved = m.most_moved_other_classes
    assert moved[0].class_key == "001_wall" and moved[0].iou_change < 0
    assert all(row.iou_change == 0 for row in moved[1:])


def test_codes_written_chunk_by_chunk_are_every_latents_column(tmp_path):
    """val_codes sorts its codes a chunk at a time on disk and merges them into columns a range of latents at a
    time: with chunks of a few codes and spans of the images, each latent's column is still every token where it
    fires, ascending, with its code there; the logits and pixel predictions are the probe's."""
    gen = torch.Generator().manual_seed(3)
    d, S = 6, 20
    sae = Sae(SaeSpec("topk", d, S, 3))
    with torch.no_grad():
        sae.W_enc_SD.copy_(torch.randn(S, d, generator=gen))
        sae.W_dec_SD.copy_(torch.randn(S, d, generator=gen))
    probe = Probe(torch.randn(151, d, generator=gen), torch.randn(151, generator=gen))
    acts = torch.randn(7, 4, d, generator=gen).numpy()
    labels = np.random.default_rng(3).choice([0, 3, 10], size=(7, 2, 2)).astype(np.uint8)
    cache = write_val_cache(tmp_path / "val.zarr", acts, labels)
    spans = [(1, 3), (4, 7)]
    codes = codes_of(tmp_path / "codes", sae, probe, cache, spans=spans, block_images=2, chunk_entries=5)
    x_ND = torch.from_numpy(np.concatenate([acts[a:b] for a, b in spans]).reshape(-1, d))
    with torch.no_grad():
        vals_NK, idx_NK = sae.encode(x_ND)
    assert len(codes.values_M) == int((vals_NK > 0).sum()) and codes.indptr_S1[-1] == len(codes.values_M)
    for latent in range(S):
        fires_NK = (idx_NK == latent) & (vals_NK > 0)
        tokens, values = codes.column(latent)
        assert tokens.tolist() == fires_NK.any(1).nonzero().squeeze(1).tolist()
        assert torch.equal(values, vals_NK[fires_NK])
    assert torch.allclose(codes.logits_NC, x_ND @ probe.weight_CD.T + probe.bias_C, atol=1e-5)
    assert codes.pixel_pred_BHW.shape == (5, 4, 4) and codes.meta["cache"]["spans"] == [[1, 3], [4, 7]]
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == ["val_codes.json", "val_codes.safetensors"]


def test_shortcut_equals_the_explicit_form(tmp_path):
    gen = torch.Generator().manual_seed(0)
    d, S = 8, 24
    sae = Sae(SaeSpec("topk", d, S, 4))
    with torch.no_grad():
        sae.W_enc_SD.copy_(torch.randn(S, d, generator=gen))
        sae.W_dec_SD.copy_(torch.nn.functional.normalize(torch.randn(S, d, generator=gen), dim=1))
        sae.b_dec_D.copy_(torch.randn(d, generator=gen))
    probe = Probe(torch.randn(151, d, generator=gen), torch.randn(151, generator=gen))
    acts = torch.randn(4, 9, d, generator=gen).numpy()
    labels = np.random.default_rng(0).choice([0, 3, 10], size=(4, 3, 3)).astype(np.uint8)
    cache = write_val_cache(tmp_path / "val.zarr", acts, labels)
    codes = codes_of(tmp_path / "codes", sae, probe, cache)
    max_act = np.abs(np.random.default_rng(1).standard_normal(S)) + 1
    pixels = torch.from_numpy(cache.read("pixel_labels", 0, 4))
    model = SuppressionModel(sae.W_dec_SD.detach(), probe.weight_CD, max_act, np.full(S, 0.1), codes,
                                torch.from_numpy(labels).reshape(-1), pixels, 3)
    x_ND = torch.from_numpy(acts.reshape(-1, d))
    most_frequent = int(codes.indptr_S1.diff().argmax())
    latents = (most_frequent, *[i for i in (5, 11) if i != most_frequent])
    for mode in MODES:
        for scale in (-2.0, 0.0, 0.5):
            effect = LatentEffect(model, latents)
            with torch.no_grad():
                explicit = edited_activations(sae, x_ND, latents, effect.values(scale), mode)
                explicit_logits = explicit @ probe.weight_CD.T + probe.bias_C
                delta = explicit - x_ND
            shortcut = codes.logits_NC + effect.shift(scale, mode).dense(torch.arange(len(x_ND)))
            torch.testing.assert_close(shortcut, explicit_logits, atol=1e-4, rtol=1e-5)
            rest, norms_U = effect.norms(scale, mode)
            norms = torch.full((len(x_ND),), rest)
            norms[effect.tokens_U] = norms_U
            torch.testing.assert_close(norms, delta.norm(dim=1), atol=1e-4, rtol=1e-5)


def test_fast_evaluation_equals_full_recomputation():
    gen = torch.Generator().manual_seed(3)
    n_images, grid, crop = 6, 4, 56
    # Smooth class maps (blobs) with noise, so windows are a mix of uncontested and contested ones.
    base = torch.randn(n_images, 151, 2, 2, generator=gen) * 3
    logits_BCgg = torch.nn.functional.interpolate(base, size=(grid, grid), mode="bilinear", align_corners=False)
    logits_NC = (logits_BCgg + 0.3 * torch.randn(logits_BCgg.shape, generator=gen)).permute(0, 2, 3, 1).reshape(-1, 151)
    labels_N = torch.randint(0, 6, (len(logits_NC),), generator=gen)
    pixel_labels = torch.randint(0, 6, (n_images, crop, crop), generator=gen)
    pixel_pred = pixel_predictions(grid_logits(logits_NC.reshape(n_images, -1, 151), grid), crop)
    patch = PatchBaseline.build(logits_NC, labels_N)
    pixel = PixelBaseline.build(logits_NC, pixel_labels, pixel_pred, grid)
    assert torch.equal(pixel.counts_KK, ConfusionMatrix().update(pixel_pred, pixel_labels).counts_KK)
    for trial, (shift_scale, n_rows) in enumerate([(0.0, 0), (0.0, 7), (0.5, 0), (2.0, 5), (8.0, 30)]):
        rows = torch.unique(torch.randint(0, len(logits_NC), (n_rows,), generator=gen))
        shift = LogitShift.explicit(torch.randn(151, generator=gen) * shift_scale, rows,
                           torch.randn(len(rows), 151, generator=gen) * 3)
        dense = logits_NC + shift.dense(torch.arange(len(logits_NC)))
        assert torch.equal(patch.predictions_after(shift), patch_predictions(dense)), trial
        expected = ConfusionMatrix().update(pixel_predictions(grid_logits(dense.reshape(n_images, -1, 151), grid),
                                                              crop), pixel_labels).counts_KK
        # Bilinear sums in another order may split an exact tie differently: allow a handful of pixels.
        per_image = ImageCounts(3, pixel_labels, pixel_pred)
        counts = pixel.counts_after(patch, shift, per_image)
        assert int((counts - expected).abs().sum()) <= 2, trial
        # Per image, class 3's counts agree with the whole-set matrix and with each image's own recomputation.
        assert (int(per_image.pred_B.sum()), int(per_image.tp_B.sum())) == (int(counts[1:, 3].sum()),
                                                                          int(counts[3, 3]))
        assert int(per_image.gt_B.sum()) == int(counts[3].sum())
        after = pixel_predictions(grid_logits(dense.reshape(n_images, -1, 151), grid), crop)
        own = ImageCounts(3, pixel_labels, after)
        assert int((own.pred_B - per_image.pred_B).abs().sum() + (own.tp_B - per_image.tp_B).abs().sum()) <= 2


def test_candidates_found_either_way_give_the_same_moves(monkeypatch):
    # The candidates of a shift by binary search in the (prediction, margin) order, or by one pass over the margins
    # (many candidates), settled in blocks of 7 tokens: the moves equal the full recomputation's either way.
    gen = torch.Generator().manual_seed(5)
    logits_NC = torch.randn(300, 151, generator=gen) * 2
    logits_NC[:40, 7] = logits_NC[:40, 1:].amax(1)  # ties: the lower class wins
    patch = PatchBaseline.build(logits_NC, torch.randint(0, 6, (300,), generator=gen))
    monkeypatch.setattr(logit_shift, "SETTLE_BLOCK", 7)
    for share in (0.0, 1.0):
        monkeypatch.setattr(logit_shift, "SPARSE_SHARE", share)
        for scale, n_rows in [(0.3, 0), (3.0, 11), (30.0, 50)]:
            rows = torch.unique(torch.randint(0, 300, (n_rows,), generator=gen))
            d_C = torch.randn(151, generator=gen) * scale
            shift = LogitShift(d_C, rows, d_C, RowTerm(torch.randn(len(rows), 2, generator=gen),
                                                      torch.randn(2, 151, generator=gen)))
            dense = patch_predictions(logits_NC + shift.dense(torch.arange(300)))
            assert torch.equal(patch.predictions_after(shift), dense), (share, scale)


def test_a_direction_decides_every_length_as_the_full_recomputation():
    # Shifts t_n q along one direction: the ray's exits decide every token at every length as the argmax of
    # logits + t_n q does, ties and exact exits included (those are recomputed).
    gen = torch.Generator().manual_seed(6)
    logits_NC = torch.randn(400, 151, generator=gen)
    q_C = torch.randn(151, generator=gen)
    logits_NC[:20, 9] = logits_NC[:20, 1:].amax(1)  # ties at the baseline
    patch = PatchBaseline.build(logits_NC, torch.zeros(400, dtype=torch.long))
    ray = RayExit.build(patch, q_C)
    # By hand, one token: predicted p, the first class to catch it along q at (l_p - l_c) / (q_c - q_p).
    p = int(patch.pred_N[100])
    rise = q_C[1:] - q_C[p]
    gap = logits_NC[100, p] - logits_NC[100, 1:]
    expected = min(float(g / r) for g, r in zip(gap, rise) if r > 0)
    assert abs(float(ray.exit_N[100]) - expected) < 1e-5 * (1 + expected)
    for trial in range(6):
        t_N = torch.rand(400, generator=gen) * 4 * trial
        t_N[::7] = 0.0
        t_N[3:9] = ray.exit_N[3:9].clamp(max=1e3)  # exactly at the exit
        shift = LogitShift(torch.zeros(151), torch.arange(400), torch.zeros(151),
                           RowTerm(t_N[:, None], q_C[None, :]))
        changed = ray.changed(patch, t_N, shift)
        assert torch.equal(changed, patch_predictions(logits_NC + t_N[:, None] * q_C) != patch.pred_N), trial


def test_direction_controls_from_the_ray_equal_their_shifts(tmp_path):
    _, _, _, model = tiny_world(tmp_path)
    config = SuppressionSettings(control_seeds=3)
    for class_index in (1, 2):
        patches = ClassPatches(model, class_index)
        for latents in [(0,), (0, 1)]:
            for mode in MODES:
                for scale in (-2.0, -0.5, 0.0):
                    effect, _ = patches.edit(latents, mode, scale)
                    draws = patches.draws(latents, config)
                    _, directions = patches.controls(effect, draws, scale, mode)
                    shifts = effect.control_shifts(model, [], [d for _, d in draws], scale, mode)[1]
                    for ray, shift in zip(directions, shifts):
                        assert torch.equal(ray.tokens_X, patches.changed(shift).tokens_X.sort().values)
                        assert np.array_equal(ray.target_B, patches.changed(shift).target_B)


def test_controls_are_deterministic_and_frequency_matched(tmp_path):
    _, _, _, model = tiny_world(tmp_path)
    config = SuppressionSettings(control_seeds=3, frequency_pool=1)
    draws = lambda config: control_draws(model.frequency_S, 4, 10, (0,), config)  # noqa: E731
    first, again = draws(config), draws(config)
    assert [r for r, _ in first] == [r for r, _ in again]
    assert all(torch.equal(u, v) for (_, u), (_, v) in zip(first, again))
    # Pool 1: the nearest other latent in firing frequency (0.33 -> 0.17, the lower id first).
    assert all(r == (1,) for r, _ in first)
    assert all(abs(float(u.norm()) - 1) < 1e-6 for _, u in first)
    other_seed = draws(SuppressionSettings(control_seeds=3, seed=1))
    assert not all(torch.equal(u, v) for (_, u), (_, v) in zip(first, other_seed))
    freq = np.array([0.5, 0.01, 0.011, 0.2, 0.49, 0.009])
    rng = np.random.default_rng(0)
    assert matched_latents(freq, (1, 0), rng, pool=1) == (2, 4)


def test_class_specific_rule():
    rule = is_class_specific
    assert rule(0.6, 0.19, [0.3, 0.1])  # 0.6 >= 0.5, >= 3 x 0.19, >= 2 x 0.3
    assert not rule(0.49, 0.0, [0.0, 0.0])  # too few target patches change
    assert not rule(0.6, 0.21, [0.0, 0.0])  # less than 3x the other change rate
    assert not rule(0.6, 0.0, [0.1, 0.31])  # less than 2x the larger control
    assert not rule(math.nan, 0.0, [0.0, 0.0])


def test_absent_and_unchosen_classes(tmp_path):
    _, _, _, model = tiny_world(tmp_path)
    absent = study(model, 150, (0,))
    assert absent.status == "absent_from_validation" and absent.target_pixels == 0 and absent.configured is None
    assert absent.class_key == "150_flag" and absent.setting == Setting("f1", 1, "every_token", -2.0)
    unchosen = study(model, 3, ())
    assert unchosen.status == "no_latents" and not unchosen.specific and unchosen.dose_response == ()


def test_json_safe_turns_non_finite_numbers_into_null():
    assert json_safe({"a": math.nan, "b": [1.0, math.inf]}) == {"a": None, "b": [1.0, None]}


def test_summary_counts_and_the_oracle_diagnostic():
    def rows(key, cells):
        return [DoseRow(key, SweepRow(Setting("f1", 3, m, s), 0, t, o, math.nan, specific=spec,
                                      specific_resamples=resamples)) for m, s, t, o, spec, resamples in cells] + [DoseRow(key, SweepRow(Setting("f1", 5, "every_token", -2.0), 0,
                                                                        1.0, 0.0, math.nan))]
    # On 40 shared resamples: grass where active specific on all, floor on the first 35.
    dose = (rows("010_grass", [("every_token", -2.0, 0.9, 0.5, False, "0" * 40),
                               ("where_active", -2.0, 0.8, 0.1, True, "1" * 40)])
            + rows("003_floor", [("every_token", -2.0, 0.9, 0.6, False, "0" * 40),
                                 ("where_active", -2.0, 0.7, 0.1, True, "1" * 35 + "0" * 5)]))
    counts = setting_counts(dose)
    # Only rows measured with their controls count; the row of 5 latents has none.
    assert [(c.n_latents, c.mode, c.counts.n_specific) for c in counts] == [(3, "every_token", 0),
                                                                             (3, "where_active", 2)]
    assert counts[1].counts.mean_target_change_rate == 0.75 and counts[1].counts.mean_other_change_rate == 0.1
    # 5 of 40 resampled counts are 1, 35 are 2: the 2.5th percentile is 1, the 97.5th 2.
    assert (counts[0].counts.n_specific_ci, counts[1].counts.n_specific_ci) == (Interval(0.0, 0.0), Interval(1.0, 2.0))
    assert oracle(counts) == (2, "-2 x max, where_active, 3 latents")


def study(model, class_index, latents, config=SuppressionSettings(), tuning=None):
    """The study of one class on the tiny world, its ranking the given latents."""
    return study_class(model, tuning, class_index, Selection("f1", latents), {"f1": latents}, config)


def test_nearest_latents_by_partition_equal_a_stable_sort():
    rng = np.random.default_rng(0)
    for trial in range(500):
        n, size = int(rng.integers(1, 40)), int(rng.integers(1, 60))
        distance = rng.integers(0, 4, size).astype(float) if trial % 2 else rng.random(size)  # ties, or none
        distance[rng.random(size) < 0.2] = np.inf  # latents already taken
        expected = np.argsort(distance, kind="stable")[:n]
        assert np.array_equal(smallest(distance, n), expected[np.isfinite(distance[expected])]), trial


def test_an_unreadable_dataset_leaves_the_examples_blank_and_says_which_image_and_why(tmp_path):
    messages = []
    load = validation_crops(str(tmp_path / "moved"), 28, log=messages.append)
    assert load("ADE_val_00000001") is None and load("ADE_val_00000002") is None
    assert "ADE_val_00000001" in messages[0] and "cannot be read" in messages[0] and "moved" in messages[0]
    assert "ADE_val_00000002" in messages[1] and len(messages) == 2
