"""The per-class suppression study: a sweep over ranking rule x number of latents x mode x scale, a setting tuned on
held-out training images only, and the configured and tuned settings measured once on validation, with controls,
95% bootstrap intervals over validation images, and the TPP score."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..probe.metrics import ConfusionMatrix
from ..report.results import ClassReport, Control, Measured, Selection, Setting, SweepRow, Tuning
from ..settings import RULES, SuppressionSettings
from .edit import LatentEdit
from .effect import effect_ranking
from .logit_shift import ImageCounts
from .measures import (
    bootstrap_weights,
    iou_change_interval,
    is_class_specific,
    mean,
    most_moved,
    pixel_measures,
    ratio_interval,
    specific_per_resample,
    tpp_score,
)
from .model import SuppressionModel
from .patches import Changed, ClassPatches
from .workers import release_memory, single_thread


def study_class(model: SuppressionModel, tuning: SuppressionModel | None, class_index: int, selection: Selection,
                rankings: dict[str, tuple[int, ...]],
                config: SuppressionSettings = SuppressionSettings()) -> ClassReport:
    """Everything a class's report holds (NaN where undefined): the configured setting (the selection's latents) and
    the one tuned on `tuning` (held-out training images) over `rankings`, each measured on validation `model`."""
    from ..data.ade20k import class_by_index

    ade_class = class_by_index(class_index)
    with single_thread():
        patches = ClassPatches(model, class_index)
        setting = Setting(selection.rule, len(selection.latents), config.mode, float(config.scale))
        report = ClassReport(ade_class.key, ade_class.name, class_index, "evaluated", "", selection, setting,
                             int(model.pixels_BC[:, class_index].sum()), patches.n_target,
                             config.specificity_rule(), config)
        if report.target_pixels == 0:
            return replace(report, status="absent_from_validation",
                           reason="no validation pixel carries this class: nothing to measure")
        if not selection.latents:
            return replace(report, status="no_latents",
                           reason="no latents were chosen for this class (see class_latents)")
        weights_RB = bootstrap_weights(model.n_images, config.bootstrap_resamples, [config.seed, class_index])
        shared_RB = shared_resamples(model.n_images, config)
        configured = measure(patches, selection.latents, setting, config, weights_RB, shared_RB)
        tuned = (tune(tuning, class_index, rankings, config) if tuning is not None else
                 Tuning("no_tuning_images", "no held-out training images were given"))
        release_memory()  # what the tuning's caches held
        measured, best, per_rule, dose = None, None, {}, ()
        if tuned.effect is not None:
            rankings = {**rankings, "effect": tuned.effect.latents}
        if tuned.chosen is not None:
            measured = measure(patches, _top(rankings, tuned.setting), tuned.setting, config, weights_RB, shared_RB)
            best = (measured.patch if tuned.best.setting == tuned.setting else
                    sweep_row(patches, tuned.best.setting, _top(rankings, tuned.best.setting), config, True,
                              weights_RB, shared_RB))
        # Under propagate every setting runs the backbone's tail: the per-rule settings and the validation sweep
        # are left out (the configured and the tuned setting are measured in full).
        if config.mechanism == "shortcut":
            per_rule = {rule: sweep_row(patches, row.setting, _top(rankings, row.setting), config, True, weights_RB,
                                        shared_RB) for rule, row in tuned.per_rule.items()}
            dose = dose_response(patches, rankings.get(selection.rule) or selection.latents, selection.rule,
                                 len(selection.latents), config, weights_RB, shared_RB)
    return replace(report, configured=configured, tuning=tuned, tuned=measured, tuned_per_rule=per_rule,
                   dose_response=dose, tuned_best=best)


def shared_resamples(n_images: int, config: SuppressionSettings) -> np.ndarray:
    """The study's resamples of the validation images that every class shares (seeded by the seed alone), so that
    the summary can count class-specific classes on each: [resamples, images]."""
    return bootstrap_weights(n_images, config.bootstrap_resamples, [config.seed])


def _top(rankings: dict[str, tuple[int, ...]], setting: Setting) -> tuple[int, ...]:
    """The latents of a setting: the top n of its rule's ranking."""
    return tuple(rankings[setting.rule][:setting.n_latents])


# ---------------------------------------------------------------------------------------------------------------
# Patch level: one setting with its controls


def candidate_settings(rankings: dict[str, tuple[int, ...]], rules, n_latents: tuple[int, ...],
                       grid: list[tuple[str, float]], fixed_n: dict[str, int] | None = None) -> list[Setting]:
    """Every (rule, N, mode, scale) of a sweep; N beyond a ranking's length is the whole ranking, counted once; a
    rule of `fixed_n` (the effect rule) only at its own N."""
    out = []
    for rule in rules:
        ranking = rankings.get(rule) or ()
        numbers = (fixed_n[rule],) if rule in (fixed_n or {}) else n_latents
        for n in sorted({min(n, len(ranking)) for n in numbers} - {0}):
            out += [Setting(rule, n, mode, scale) for mode, scale in grid]
    return out


def sweep_row(patches: ClassPatches, setting: Setting, latents: tuple[int, ...], config: SuppressionSettings,
              with_controls: bool, weights_RB: np.ndarray | None = None,
              shared_RB: np.ndarray | None = None) -> SweepRow:
    """Patch-level figures of one setting; with controls, the verdict too; with `weights_RB`, intervals; with
    `shared_RB` (and controls), the verdict on each shared resample."""
    effect, changed = patches.edit(latents, setting.mode, setting.scale)
    return patch_figures(patches, setting, latents, effect, changed, config, with_controls, weights_RB,
                         shared_RB=shared_RB)


def patch_figures(patches: ClassPatches, setting: Setting, latents: tuple[int, ...], effect: LatentEdit,
                  changed: Changed, config: SuppressionSettings, with_controls: bool,
                  weights_RB: np.ndarray | None = None, shared_RB: np.ndarray | None = None,
                  per_seed: tuple[list[Changed], list[Changed]] | None = None) -> SweepRow:
    """The change rates and target accuracy of an edit; with controls (`per_seed`: made before), each control over
    its seeds and the verdict (against the largest single draw), and with `shared_RB` the verdict on each of those
    resamples of the images; with `weights_RB`, 95% bootstrap intervals over images."""
    target, other = patches.target_rate(changed), patches.other_rate(changed)
    random_latents = random_direction = specific = target_ci = other_ci = None
    resampled = ""
    if with_controls:
        if per_seed is None:
            per_seed = patches.controls(effect, patches.draws(latents, config), setting.scale, setting.mode)
        random_latents, random_direction = (control(patches, seeds, weights_RB) for seeds in per_seed)
        specific = is_class_specific(target, other, [random_latents.target_change_max,
                                                     random_direction.target_change_max], config)
        if shared_RB is not None:
            verdicts_R = specific_per_resample(shared_RB, patches.target_B, changed.target_B, patches.other_B,
                                               changed.other_B, [[c.target_B for c in seeds] for seeds in per_seed],
                                               config)
            resampled = "".join("01"[int(v)] for v in verdicts_R)
    if weights_RB is not None:
        target_ci = ratio_interval(weights_RB, changed.target_B, patches.target_B)
        other_ci = ratio_interval(weights_RB, changed.other_B, patches.other_B)
    return SweepRow(setting, effect.n_tokens, target, other, patches.target_accuracy(changed),
                    random_latents, random_direction, specific, target_ci, other_ci, resampled)


def control(patches: ClassPatches, per_seed: list[Changed], weights_RB: np.ndarray | None = None) -> Control:
    """One control over its seeds: the mean change rates, the largest target change rate, and with `weights_RB` the
    intervals of the mean over draws (the seeds pooled per image)."""
    target = [patches.target_rate(c) for c in per_seed]
    out = Control(mean(target), mean(patches.other_rate(c) for c in per_seed), float(max(target)))
    if weights_RB is None:
        return out
    n = len(per_seed)
    return replace(out, target_change_rate_ci=ratio_interval(weights_RB, sum(c.target_B for c in per_seed),
                                                             patches.target_B * n),
                   other_change_rate_ci=ratio_interval(weights_RB, sum(c.other_B for c in per_seed),
                                                       patches.other_B * n))


# ---------------------------------------------------------------------------------------------------------------
# Tuning on held-out training images


TUNING_STREAM = 1  # the tuning's bootstrap draws its own stream of the class's seed, apart from validation's


def _preference(row: SweepRow, config: SuppressionSettings) -> tuple:
    """Specific with few other patches changed first, then specific, then the widest margin of the target change
    over the other patches and the controls."""
    values = [row.target_change_rate, row.other_change_rate,
              *(c.target_change_max if c is not None else 0.0 for c in (row.random_latents, row.random_direction))]
    if any(not math.isfinite(v) for v in values):
        return (False, False, -math.inf)
    specific = bool(row.specific)
    margin = values[0] - max(values[1:])
    return (specific and values[1] <= config.max_other_change, specific, margin)


def simplicity(setting: Setting) -> tuple:
    """Simpler first: fewer latents, then a smaller |scale| (a milder edit), then where_active (fewer tokens; at
    scale 0 both modes are one edit, equally simple)."""
    return (setting.n_latents, abs(setting.scale), setting.mode != "where_active" and setting.scale != 0)


def choose(checked: list[tuple[SweepRow, float]], unchecked: list[SweepRow], check: Callable[[SweepRow], SweepRow],
           most: int, config: SuppressionSettings) -> tuple[SweepRow, SweepRow, float]:
    """(the chosen, the best, the best's margin SE). The best is the preferred (`_preference`; the first of equals)
    of the `checked` candidates, each with its controls, verdict and margin's bootstrap SE over the tuning images.
    With `tuning_one_se` the chosen is the simplest (`simplicity`, then the wider margin) candidate in the best's tier
    (its two verdict flags) whose margin is at least the best's minus the best's SE: among the checked ones, then
    among the `unchecked` ones simpler than that, given their controls by `check` in order of simplicity (then target
    minus other) until one is within, at most `most` of them; those whose target minus other change rate, their
    margin at most, is below the floor are never checked."""
    best, se = max(checked, key=lambda c: _preference(c[0], config))
    if not config.tuning_one_se:
        return best, best, se
    tier, margin = _preference(best, config)[:2], _preference(best, config)[2]
    floor = margin - (se if math.isfinite(se) else 0.0)

    def within(row: SweepRow) -> bool:
        return _preference(row, config)[:2] == tier and _preference(row, config)[2] >= floor

    chosen = min((row for row, _ in checked if within(row)),
                 key=lambda row: (simplicity(row.setting), -_preference(row, config)[2]))
    done = {row.setting for row, _ in checked}
    reach = sorted((row for row in unchecked if row.setting not in done
                    and simplicity(row.setting) < simplicity(chosen.setting)
                    and row.target_change_rate - row.other_change_rate >= floor),
                   key=lambda row: (simplicity(row.setting), row.other_change_rate - row.target_change_rate))
    for row in reach[:most]:
        if within(row := check(row)):
            return row, best, se
    return chosen, best, se


def margin_se(patches: ClassPatches, changed: Changed, per_seed: tuple[list[Changed], list[Changed]],
              weights_RB: np.ndarray) -> float:
    """The standard error of a setting's margin (as `_preference` reckons it: target change rate minus the largest of
    the other patches' and of every control draw's target change rate) over bootstrap resamples of the images (NaN
    with fewer than two resamples where it is defined)."""
    def rate_R(num_B, den_B) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (weights_RB @ np.asarray(num_B, np.float64)) / (weights_RB @ np.asarray(den_B, np.float64))

    largest_R = rate_R(changed.other_B, patches.other_B)
    for draw in (c for seeds in per_seed for c in seeds):
        largest_R = np.maximum(largest_R, rate_R(draw.target_B, patches.target_B))
    margin_R = rate_R(changed.target_B, patches.target_B) - largest_R
    margin_R = margin_R[np.isfinite(margin_R)]
    return float(np.std(margin_R, ddof=1)) if len(margin_R) > 1 else math.nan


def checked_row(patches: ClassPatches, setting: Setting, latents: tuple[int, ...], config: SuppressionSettings,
                weights_RB: np.ndarray) -> tuple[SweepRow, float]:
    """A tuning candidate with its controls and verdict, and its margin's bootstrap SE over the tuning images."""
    effect, changed = patches.edit(latents, setting.mode, setting.scale)
    per_seed = patches.controls(effect, patches.draws(latents, config), setting.scale, setting.mode)
    return (patch_figures(patches, setting, latents, effect, changed, config, True, per_seed=per_seed),
            margin_se(patches, changed, per_seed, weights_RB))


def tune(model: SuppressionModel, class_index: int, rankings: dict[str, tuple[int, ...]],
         config: SuppressionSettings) -> Tuning:
    """The setting chosen for one class on the held-out training images in `model` (never validation): every
    candidate's target and other change rates; the best `tuning_candidates` per rule (other change rate within
    `max_other_change` first, then the margin of target over other) also get their controls and their margin's
    bootstrap SE over the tuning images; `choose` picks among them (and the simpler candidates it checks too),
    overall and per rule. Every check is made once."""
    with single_thread():
        patches = ClassPatches(model, class_index)
        if patches.n_target == 0:
            return Tuning("absent_from_tuning_images",
                          "no held-out training patch has this class as its majority label")
        n_latents, grid, n_candidates = config.tuning_grid()
        effect = fixed_n = None
        # The effect rule scores hundreds of latent sets: under propagate each would run the backbone's tail.
        if "effect" in config.tuning_rules and config.mechanism == "shortcut":
            effect = effect_ranking(patches, {r: rankings[r] for r in RULES if rankings.get(r)}, config)
            rankings, fixed_n = {**rankings, "effect": effect.latents}, {"effect": effect.n_chosen}
        rows = [sweep_row(patches, setting, _top(rankings, setting), config, False)
                for setting in candidate_settings(rankings, config.tuning_rules, n_latents, grid, fixed_n)]
        weights_RB = bootstrap_weights(model.n_images, config.bootstrap_resamples,
                                       [config.seed, class_index, TUNING_STREAM]).astype(np.float64)  # cast once
        checks: dict[Setting, tuple[SweepRow, float]] = {}

        def check(row: SweepRow) -> tuple[SweepRow, float]:
            if row.setting not in checks:
                checks[row.setting] = checked_row(patches, row.setting, _top(rankings, row.setting), config,
                                                  weights_RB)
            return checks[row.setting]

        checked = {}
        for rule in config.tuning_rules:
            mine = [r for r in rows if r.setting.rule == rule]
            mine.sort(key=lambda r: (r.other_change_rate <= config.max_other_change,
                                     r.target_change_rate - r.other_change_rate), reverse=True)
            if mine:
                checked[rule] = [check(r) for r in mine[:n_candidates]]
        if not checked:
            return Tuning("no_candidates", "no ranking holds a latent for this class")
        with_controls = lambda row: check(row)[0]  # noqa: E731
        chosen, best, se = choose([c for mine in checked.values() for c in mine], rows, with_controls, n_candidates,
                                  config)
        per_rule = {rule: choose(mine, [r for r in rows if r.setting.rule == rule], with_controls, n_candidates,
                                 config)[0] for rule, mine in checked.items()}
    return Tuning("tuned", "", model.n_images, patches.n_target, chosen, per_rule, tuple(rows), effect, best, se)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def measure(patches: ClassPatches, latents: tuple[int, ...], setting: Setting, config: SuppressionSettings,
            weights_RB: np.ndarray, shared_RB: np.ndarray) -> Measured:
    """One setting on validation: patch-level change rates of the edit and both controls with 95% bootstrap
    intervals over images, the verdict (and on each of the `shared_RB` resamples), the TPP score, and pixel-level
    IoU and accuracy (with the interval of the target IoU change)."""
    model, class_index = patches.model, patches.class_index
    effect, changed = patches.edit(latents, setting.mode, setting.scale)
    patch = patch_figures(patches, setting, latents, effect, changed, config, True, weights_RB, shared_RB)
    before = ImageCounts(class_index, model.pixel_labels_BHW, model.codes.pixel_pred_BHW)
    after_counts = ImageCounts(class_index, model.pixel_labels_BHW, model.codes.pixel_pred_BHW)
    shift = effect.shift(setting.scale, setting.mode)
    after = ConfusionMatrix.from_counts(model.pixel.counts_after(model.patch, shift, after_counts))
    pixels = pixel_measures(model.pixel_before, after, class_index,
                            iou_change_interval(weights_RB, before, after_counts))
    return Measured(patch, tuple(latents), tuple(float(v) for v in effect.values(setting.scale)),
                    tpp_score(model.patch.labels_N, model.patch.pred_N, patches.predictions(changed), class_index),
                    pixels, most_moved(model.pixel_before, after, class_index),
                    tuple(r for r, _ in patches.draws(latents, config)))


def dose_response(patches: ClassPatches, ranking: tuple[int, ...], rule: str, configured_n: int,
                  config: SuppressionSettings, weights_RB: np.ndarray,
                  shared_RB: np.ndarray) -> tuple[SweepRow, ...]:
    """Validation, patch level: every N of the sweep x mode x scale for the configured rule's ranking, with 95%
    intervals over images; the rows of the configured N carry their controls and verdict, on each shared resample
    too (these give the counts per setting and the optimistic `n_specific_oracle`)."""
    return tuple(sweep_row(patches, setting, tuple(ranking[:setting.n_latents]), config,
                           setting.n_latents == configured_n, weights_RB, shared_RB)
                 for setting in candidate_settings({rule: ranking}, (rule,), config.n_latents, config.dose_grid()))
