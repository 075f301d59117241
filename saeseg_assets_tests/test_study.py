"""The suppression study on hand-made numbers: bootstrap intervals with known answers, the probe-aware ranking, the
TPP score, the max-over-seeds specificity rule, and tuning that never looks at validation."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saeseg_assets.core.report.results import Control, Interval, Selection, Setting, SweepRow
from saeseg_assets.core.settings import SelectionSettings, SuppressionSettings
from saeseg_assets.core.study.class_study import choose, margin_se, simplicity, study_class, tune
from saeseg_assets.core.study.latent_stats import STAT_FIELDS, LatentStats
from saeseg_assets.core.study.measures import (
    bootstrap_weights,
    iou_change_interval,
    is_class_specific,
    ratio_interval,
    specific_per_resample,
    tpp_score,
    unmet_criterion,
)
from saeseg_assets.core.study.rules import margin_effects, select_class_latents
from saeseg_assets_tests.test_suppression import tiny_world


def test_bootstrap_weights_draw_images_with_replacement():
    weights = bootstrap_weights(5, 1000, seed=[0, 10])
    assert weights.shape == (1000, 5) and (weights.sum(1) == 5).all()
    assert np.array_equal(weights, bootstrap_weights(5, 1000, seed=[0, 10]))  # seeded: the same every time
    assert abs(weights.mean() - 1.0) < 1e-12 and 0.3 < (weights == 0).mean() < 0.37  # (4/5)^5 = 0.33 left out


def test_ratio_interval_known_answers():
    weights = bootstrap_weights(20, 1000, seed=0)
    # Every image has the same ratio: every resample gives exactly it.
    assert ratio_interval(weights, np.full(20, 3.0), np.full(20, 4.0)) == Interval(0.75, 0.75)
    # Half of 20 one-patch images changed: a proportion of 0.5, whose 95% interval is about 0.5 +- 1.96 x 0.112.
    ci = ratio_interval(bootstrap_weights(20, 4000, seed=1), np.r_[np.ones(10), np.zeros(10)], np.ones(20))
    assert ci.low == pytest.approx(0.281, abs=0.04) and ci.high == pytest.approx(0.719, abs=0.04)
    # The same figures as resampling the images explicitly with the same draws.
    num, den = np.arange(1.0, 8.0), np.arange(2.0, 9.0) ** 2
    draws = np.random.default_rng(7).integers(0, 7, (1000, 7))
    explicit = np.percentile(num[draws].sum(1) / den[draws].sum(1), [2.5, 97.5])
    ci = ratio_interval(bootstrap_weights(7, 1000, seed=7), num, den)
    assert (ci.low, ci.high) == pytest.approx(tuple(explicit))


def test_iou_change_interval_of_identical_images_is_the_change_itself():
    # Each image: 4 pixels of the class; before 3 predicted right and 1 wrong elsewhere, after 1 right, none wrong.
    counts = lambda pred, tp: SimpleNamespace(gt_B=torch.full((10,), 4), pred_B=torch.full((10,), pred),  # noqa
                                              tp_B=torch.full((10,), tp))
    before, after = counts(4, 3), counts(1, 1)
    ci = iou_change_interval(bootstrap_weights(10, 1000, seed=0), before, after)
    # IoU before 3 / (4 + 4 - 3) = 0.6, after 1 / (4 + 1 - 1) = 0.25.
    assert ci.low == pytest.approx(-0.35) and ci.high == pytest.approx(-0.35)


def _stats(act_on_class_5: list[float]) -> LatentStats:
    """Statistics of 4 latents in which only class 5's activation sums matter; classes 5, 7, 9 present."""
    S, C = len(act_on_class_5), 151
    arrays = {name: np.zeros(C * S if name.endswith("_CS") else C if name.endswith("_C") else S)
              for name in STAT_FIELDS if not name.endswith("_ST")}
    arrays = {k: v.reshape(C, S) if k.endswith("_CS") else v for k, v in arrays.items()}
    arrays["class_act_sum_CS"][5] = np.array(act_on_class_5) * 10  # 10 patches of class 5
    arrays["class_fire_count_CS"][5] = 10
    arrays["class_patches_C"][[5, 7, 9]] = 10
    arrays["fire_count_S"][:] = 10
    arrays["act_sum_S"][:] = arrays["class_act_sum_CS"][5]
    arrays["top_values_ST"], arrays["top_tokens_ST"] = np.zeros((S, 1)), -np.ones((S, 1), dtype=np.int64)
    return LatentStats(30, 4, arrays, {"purity": 0.9})


def test_probe_aware_rule_ranks_the_latent_that_moves_only_the_class_logit_first():
    probe_W_CD = np.zeros((151, 3))
    probe_W_CD[5], probe_W_CD[7], probe_W_CD[9] = np.eye(3)
    s2 = 2 ** -0.5
    W_dec_SD = np.array([[1.0, 0.0, 0.0],  # latent 0: only class 5's logit
                         [s2, s2, 0.0],  # latent 1: class 5's and class 7's
                         [0.0, 1.0, 0.0],  # latent 2: class 7's only
                         [0.0, 0.0, 1.0]])  # latent 3: class 9's only
    stats = _stats([1.0, 2.0, 5.0, 10.0])  # the others fire more strongly on class 5
    effect_S = margin_effects(W_dec_SD, probe_W_CD, stats.class_patches_C > 0, 5)
    # w_5 - mean(w_7, w_9) = (1, -0.5, -0.5): effects 1, 0.354, -0.5, -0.5.
    np.testing.assert_allclose(effect_S, [1.0, 0.5 * s2, -0.5, -0.5])
    chosen = select_class_latents(stats, 5, SelectionSettings(rule="probe_aware", k=4), margin_effect_S=effect_S)
    assert chosen.latents == (0, 1)  # 1 x 1 beats 2 x 0.354; latents that push class 5 down are never chosen
    assert chosen.scores == pytest.approx((1.0, 2 * 0.5 * s2))
    by_activation = select_class_latents(stats, 5, SelectionSettings(rule="activation_sum", dense_frequency=1.0, k=4))
    assert by_activation.latents == (3, 2, 1, 0)  # what the activation alone would pick first


def test_tpp_score_by_hand():
    labels = torch.tensor([5, 5, 5, 5, 7, 7, 9, 9, 0])
    before = labels.clone()
    after = torch.tensor([5, 5, 7, 7, 7, 9, 9, 9, 3])
    # Class 5 loses 2 of 4 patches (0.5), class 7 1 of 2 (0.5), class 9 none; label 0 never counts.
    assert tpp_score(labels, before, after, 5) == pytest.approx(0.5 - (0.5 + 0.0) / 2)
    assert tpp_score(labels, before, after, 9) == pytest.approx(0.0 - (0.5 + 0.5) / 2)
    assert math.isnan(tpp_score(labels, before, after, 21))


def test_specificity_compares_with_the_largest_single_control_draw(tmp_path):
    # Target 0.7 beats twice the mean control (2 x 0.25) but not twice the largest draw (2 x 0.4).
    assert not is_class_specific(0.7, 0.0, [max([0.1, 0.4])])
    assert is_class_specific(0.7, 0.0, [float(np.mean([0.1, 0.4]))])
    _, _, _, model = tiny_world(tmp_path)
    report = study_class(model, None, 10, Selection("f1", (0,)), {"f1": (0,)}, SuppressionSettings(control_seeds=3))
    m = report.configured.patch
    controls = (m.random_latents, m.random_direction)
    assert all(c.target_change_max >= c.target_change_rate for c in controls)
    assert m.specific == is_class_specific(m.target_change_rate, m.other_change_rate,
                                           [c.target_change_max for c in controls])
    for ci, value in ((m.target_change_rate_ci, m.target_change_rate), (m.other_change_rate_ci, m.other_change_rate)):
        assert ci.low <= value <= ci.high
    assert report.tuning.status == "no_tuning_images" and report.tuned is None


def test_the_verdict_on_resamples_applies_the_rule_to_each_resample():
    # Two images with 2 target and 10 other patches each. The edit changes both target patches of image 0 and one
    # other patch of image 1; the one control draw changes one target patch of image 1.
    target_B, other_B = np.array([2, 2]), np.array([10, 10])
    changed_target_B, changed_other_B, control_B = np.array([2, 0]), np.array([0, 1]), np.array([0, 1])
    config = SuppressionSettings()
    # Both images once: target 0.5 >= 0.5, >= 3 x other 0.05, >= 2 x control 0.25: specific (at the edge).
    assert unmet_criterion(0.5, 0.05, [0.25], config) == "" and unmet_criterion(0.5, 0.2, [0.0], config) == "other"
    # Image 0 twice: target 1, other 0, control 0. Image 1 twice: target 0. Image 1 with no target patch: undefined.
    weights_RB = np.array([[1, 1], [2, 0], [0, 2]])
    verdicts = specific_per_resample(weights_RB, target_B, changed_target_B, other_B, changed_other_B,
                                     [[control_B]], config)
    assert verdicts.tolist() == [True, True, False]
    # A second control seed that changes both of image 0's target patches: 2 x 0.5 > 0.5 on the first resample.
    verdicts = specific_per_resample(weights_RB, target_B, changed_target_B, other_B, changed_other_B,
                                     [[control_B, np.array([2, 0])]], config)
    assert verdicts.tolist() == [False, False, False]
    assert specific_per_resample(np.array([[0, 2]]), np.array([2, 0]), np.array([2, 0]), other_B, changed_other_B,
                                 [], config).tolist() == [False]
    assert unmet_criterion(math.nan, 0.0, [], config) == "undefined"


def test_measured_settings_carry_their_verdict_on_the_shared_resamples(tmp_path):
    _, _, _, model = tiny_world(tmp_path)
    config = SuppressionSettings(control_seeds=2)
    reports = [study_class(model, None, c, Selection("f1", (0,)), {"f1": (0,)}, config) for c in (10, 21)]
    for report in reports:
        verdicts = report.configured.patch.specific_resamples
        assert len(verdicts) == config.bootstrap_resamples and set(verdicts) <= {"0", "1"}
    # The same draws of images for every class: the verdicts are a function of the class and the shared draws only.
    again = study_class(model, None, 10, Selection("f1", (0,)), {"f1": (0,)}, config)
    assert again.configured.patch.specific_resamples == reports[0].configured.patch.specific_resamples
    # Every validation sweep row has its intervals.
    assert all(row.target_change_rate_ci is not None for row in reports[0].dose_response)


def test_tuning_reads_only_the_tuning_images(tmp_path):
    """The tuned setting is a function of the tuning images alone: `tune` takes no validation data, and the study
    gives the same tuned setting whatever the validation set."""
    _, _, _, tuning = tiny_world(tmp_path / "tuning")
    config = SuppressionSettings(control_seeds=2, n_latents=(1, 2), tuning_candidates=3)
    rankings = {rule: (0, 4) for rule in ("f1", "activation_sum", "probe_aware")}
    tuned = tune(tuning, 10, rankings, config)
    assert tuned.status == "tuned" and tuned.n_images == tuning.n_images == 3
    rules = {*rankings, "effect"}
    assert {row.setting.rule for row in tuned.sweep} == rules and len(tuned.per_rule) == 4
    assert tuned.chosen.random_latents is not None and tuned.best.random_latents is not None
    assert tuned.best_margin_se >= 0 and tuned.per_rule[tuned.best.setting.rule] is not None
    settings, effects = [], []
    for name, relabel in (("validation", None), ("other", (21, 3))):
        _, _, _, validation = tiny_world(tmp_path / name)
        if relabel:  # another validation set: class 21's patches now labelled 3
            labels = validation.patch.labels_N
            labels[labels == relabel[0]] = relabel[1]
        report = study_class(validation, tuning, 10, Selection("f1", (0,)), rankings, config)
        settings.append((report.tuning.setting, report.tuning.best.setting, report.tuning.best_margin_se))
        effects.append(report.tuning.effect)
        assert report.tuned.setting == report.tuning.setting and set(report.tuned_per_rule) == rules
        # The best on the tuning images is measured on validation too, with its controls.
        assert report.tuned_best.setting == report.tuning.best.setting and report.tuned_best.specific is not None
    assert settings[0] == settings[1] == (tuned.setting, tuned.best.setting, tuned.best_margin_se)
    # The effect rule's ranking too: made on the tuning images, the same whatever the validation set.
    assert effects[0] == effects[1] == tuned.effect and tuned.effect.latents[0] == 0


def candidate(n: int, mode: str, scale: float, target: float, other: float, control: float) -> SweepRow:
    """A checked tuning candidate by f1, both controls changing `control` of the target patches at most; the verdict
    as the default rule gives it."""
    c = Control(control, 0.0, control)
    return SweepRow(Setting("f1", n, mode, scale), 10, target, other, 0.5, c, c,
                    is_class_specific(target, other, [control, control]))


def test_the_one_se_rule_takes_the_simplest_setting_within_the_noise_of_the_best():
    # Margins: target minus the largest of other and the controls. The best: 0.90 - 0.10 = 0.80, with SE 0.05.
    best = candidate(10, "every_token", -4.0, 0.90, 0.02, 0.10)
    within = [candidate(2, "every_token", -2.0, 0.78, 0.02, 0.02),  # 0.76: within 0.05 of 0.80
              candidate(2, "every_token", -1.0, 0.78, 0.02, 0.01)]  # 0.76 too, at a milder scale
    outside = candidate(1, "where_active", -1.0, 0.74, 0.01, 0.02)  # 0.72: fewer latents, but 0.08 below the best
    # Specific, margin 0.86 - 0.08 = 0.78, one latent, but 0.08 of the other patches change (> 0.05): a lower tier.
    lower_tier = candidate(1, "every_token", -2.0, 0.86, 0.08, 0.05)
    config = SuppressionSettings()
    checked = [(best, 0.05), *((row, 0.01) for row in within), (outside, 0.01), (lower_tier, 0.01)]
    assert lower_tier.specific and all(row.specific for row in within)

    def choice(checked, config=config, unchecked=(), check=None, most=8):
        return choose(checked, list(unchecked), check, most, config)

    # The best's SE decides the window; within it the fewest latents, then the smallest |scale|.
    assert choice(checked) == (within[1], best, 0.05)
    # At the same N and |scale|, where_active is simpler.
    active = candidate(2, "where_active", -1.0, 0.77, 0.02, 0.03)  # 0.74 - just outside: not chosen
    assert choice([*checked, (active, 0.01)])[0] == within[1]
    active = candidate(2, "where_active", -1.0, 0.77, 0.01, 0.01)  # 0.76: within
    assert choice([*checked, (active, 0.01)])[0] == active
    # A smaller SE narrows the window to the best alone; the rule off, the best wins whatever the noise.
    assert choice([(best, 0.005), *checked[1:]])[0] == best
    assert choice(checked, SuppressionSettings(tuning_one_se=False)) == (best, best, 0.05)
    # A best that is not class-specific admits only candidates that are not either (0.30 within 0.05 of 0.33).
    weak = [candidate(5, "every_token", -4.0, 0.40, 0.07, 0.05), candidate(1, "every_token", -4.0, 0.35, 0.05, 0.05)]
    assert not any(row.specific for row in weak)
    assert choice([(weak[0], 0.05), (weak[1], 0.0)])[0] == weak[1]


def test_the_one_se_rule_checks_simpler_candidates_of_the_sweep_in_order_until_one_is_within():
    best = candidate(10, "every_token", -4.0, 0.90, 0.02, 0.10)  # margin 0.80, SE 0.05: the floor 0.75
    checked = [(best, 0.05), (candidate(2, "every_token", -1.0, 0.78, 0.02, 0.01), 0.01)]  # 0.76: chosen so far
    # Sweep rows without controls; target minus other bounds the margin from above. With their controls:
    ablate = candidate(1, "every_token", 0.0, 0.80, 0.02, 0.30)  # 0.50: the controls change too much
    gentle = candidate(1, "where_active", -0.5, 0.80, 0.02, 0.03)  # 0.77: within
    mild = candidate(1, "every_token", -0.5, 0.90, 0.01, 0.02)  # 0.88 but less simple than `gentle`
    too_weak = candidate(1, "where_active", -0.25, 0.70, 0.0, 0.0)  # target - other 0.70 < 0.75: never checked
    complex_ = candidate(20, "where_active", -0.5, 0.95, 0.0, 0.0)  # not simpler than the choice: never checked
    with_controls = {row.setting: row for row in (ablate, gentle, mild)}
    bare = [replace(row, random_latents=None, random_direction=None, specific=None)
            for row in (mild, too_weak, complex_, gentle, ablate)]
    asked = []

    def check(row):
        asked.append(row.setting)
        return with_controls[row.setting]

    # In order of simplicity: scale 0 (outside), then -0.5 where active (within): chosen.
    assert choose(checked, bare, check, 8, SuppressionSettings()) == (gentle, best, 0.05)
    assert asked == [ablate.setting, gentle.setting]
    # At most `most` checks: after the first fails, the simplest of the checked ones stays chosen.
    asked.clear()
    assert choose(checked, bare, check, 1, SuppressionSettings())[0] == checked[1][0]
    assert asked == [ablate.setting]
    # At scale 0 the two modes are one edit: equally simple.
    assert simplicity(ablate.setting) == simplicity(replace(ablate.setting, mode="where_active")) < simplicity(
        gentle.setting)


def test_the_margin_se_is_the_spread_of_the_margin_over_resampled_images():
    # Two images of 10 target and 100 other patches; the edit changes 8 and 4 target patches, 2 other patches in each;
    # one control draw changes 1 target patch in each.
    patches = SimpleNamespace(target_B=np.array([10, 10]), other_B=np.array([100, 100]))
    changed = SimpleNamespace(target_B=np.array([8, 4]), other_B=np.array([2, 2]))
    control = [[SimpleNamespace(target_B=np.array([1, 1]))], []]
    # Resamples: image 1 twice (0.8 - 0.1), image 2 twice (0.4 - 0.1), each once (0.6 - 0.1): margins 0.7, 0.3, 0.5.
    weights_RB = np.array([[2, 0], [0, 2], [1, 1]])
    assert margin_se(patches, changed, control, weights_RB) == pytest.approx(0.2)
    # Where the controls change nothing, the other patches' 0.02 is the largest: the same spread.
    assert margin_se(patches, changed, [[], []], weights_RB) == pytest.approx(0.2)
    assert math.isnan(margin_se(patches, changed, control, weights_RB[:1]))


def test_the_effect_rule_adds_latents_while_they_help_on_the_tuning_images(tmp_path):
    from saeseg_assets.core.study.effect import candidate_pool, effect_ranking, effect_score
    from saeseg_assets.core.study.patches import ClassPatches

    _, _, _, tuning = tiny_world(tmp_path)
    config = SuppressionSettings(control_seeds=2)
    # Taken in turn from the rankings, each latent once.
    assert candidate_pool({"a": (1, 2, 0), "b": (1, 3), "c": (4,)}, 4) == [1, 4, 2, 3]
    grass = ClassPatches(tuning, 10)
    # Latent 0 carries grass: suppressed, all 4 grass patches change and none of the 8 others (1 - 0). Latent 1 carries
    # class 3: suppressed, 2 of the 8 other patches change (0 - 0.25). Latent 3 never fires: nothing changes.
    assert [effect_score(grass, (i,), config) for i in (0, 1, 3)] == [1.0, -0.25, 0.0]
    choice = effect_ranking(grass, {"f1": (1, 2, 0, 3)}, config)
    # Latent 0 first; adding latent 3 (the next best alone) raises nothing: the set stops at one latent.
    assert (choice.latents, choice.n_chosen, choice.gains, choice.pool) == ((0, 3, 1, 2), 1, (1.0,), 4)
