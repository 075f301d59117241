"""The summary over all class reports: its rows (classes, sweep, counts per setting and per rule), its figures and
sentence, the oracle diagnostic and the classes x settings grid of the heatmap."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..study.measures import mean, unmet_criterion
from .results import (
    ClassCounts,
    ClassReport,
    ClassRow,
    DoseRow,
    Interval,
    RuleRow,
    SettingCount,
    SpecificityGrid,
    StudySummary,
    SummaryFigures,
    SummaryRow,
    SweepRow,
)
from .text import describe_setting, summary_sentence, tuned_words

FORMAT_VERSION = 1  # of the summary's rows: summary.csv, dose_response.csv, specific_counts.csv, rules.csv


def evaluated(reports: list[ClassReport]) -> list[ClassReport]:
    return [r for r in reports if r.configured is not None]


def summary_rows(reports: list[ClassReport]) -> list[SummaryRow]:
    """One row per evaluated class: configured and tuned figures, controls, verdicts."""
    return [SummaryRow(r.class_index, r.class_key, r.class_name, r.target_patches, r.target_pixels, r.configured,
                       r.tuned) for r in evaluated(reports)]


def dose_rows(reports: list[ClassReport]) -> list[DoseRow]:
    """The validation sweep rows of every evaluated class, with its key."""
    return [DoseRow(r.class_key, row) for r in evaluated(reports) for row in r.dose_response]


def class_counts(rows: list[SweepRow]) -> ClassCounts:
    """How many classes, how many class-specific (with its interval), and their mean change rates."""
    return ClassCounts(len(rows), sum(bool(r.specific) for r in rows), count_interval(rows),
                       mean(r.target_change_rate for r in rows), mean(r.other_change_rate for r in rows))


def setting_counts(dose: list[DoseRow]) -> list[SettingCount]:
    """Per validation setting with controls (N, mode, scale), in the order of the sweep, over the classes."""
    groups: dict[tuple[int, str, float], list[SweepRow]] = {}
    for d in dose:
        if d.row.specific is not None:
            groups.setdefault((d.row.setting.n_latents, d.row.setting.mode, d.row.setting.scale), []).append(d.row)
    return [SettingCount(n, mode, scale, class_counts(rows)) for (n, mode, scale), rows in groups.items()]


def upper_bound(reports: list[ClassReport]) -> int:
    """Classes class-specific at one or more of the settings measured with controls on validation: the sweep at the
    configured N, the configured and the tuned setting, each rule's tuned setting, the tuning's best. Chosen per class
    on the very images it is counted on, it bounds every reported count from above; a diagnostic, never a result."""
    def measured(r: ClassReport) -> list[SweepRow]:
        return ([row for row in r.dose_response if row.specific is not None] + [r.configured.patch]
                + ([r.tuned.patch] if r.tuned is not None else []) + list(r.tuned_per_rule.values())
                + ([r.tuned_best] if r.tuned_best is not None else []))

    return sum(any(bool(row.specific) for row in measured(r)) for r in evaluated(reports))


def count_interval(rows: list[SweepRow]) -> Interval:
    """95% interval of the number of class-specific rows (one per class) over the study's shared resamples of the
    validation images: each row's verdicts per resample (`SweepRow.specific_resamples`) added up. Rows made on other
    resamples are refused."""
    lengths = {len(r.specific_resamples) for r in rows}
    if not lengths:
        return Interval(float("nan"), float("nan"))
    if len(lengths) > 1 or 0 in lengths:
        raise ValueError(f"class reports hold verdicts on {sorted(lengths)} resamples, not one shared set: "
                         "re-materialize suppression_report for every class")
    total_R = np.zeros(lengths.pop())
    for r in rows:
        total_R += np.frombuffer(r.specific_resamples.encode(), np.uint8) == ord("1")
    # Whole classes: the resampled counts' own values at the 2.5th and 97.5th percentiles, never between two.
    return Interval(float(np.percentile(total_R, 2.5, method="lower")),
                    float(np.percentile(total_R, 97.5, method="higher")))


def oracle(counts: list[SettingCount]) -> tuple[int, str]:
    """The validation setting with the most class-specific classes, and it in words (at most `upper_bound`)."""
    if not counts:
        return 0, "none"

    def gap(c: SettingCount) -> float:
        value = c.counts.mean_target_change_rate - c.counts.mean_other_change_rate
        return value if value == value else -float("inf")

    best = sorted(counts, key=lambda c: (-c.counts.n_specific, -gap(c)))[0]
    return best.counts.n_specific, f"{best.scale:g} x max, {best.mode}, {best.n_latents} latents"


def rule_rows(reports: list[ClassReport], rules: tuple[str, ...]) -> list[RuleRow]:
    """Per ranking rule, each class at that rule's own tuned setting, measured on validation (patch level)."""
    out = []
    for rule in rules:
        tuned = [r for r in evaluated(reports) if r.tuned is not None and rule in r.tuned_per_rule]
        results = [r.tuned_per_rule[rule] for r in tuned]
        on_tuning = [r.tuning.per_rule[rule] for r in tuned]
        settings = Counter(describe_setting(x.setting) for x in results)
        out.append(RuleRow(rule, class_counts(results), *overfit(on_tuning, results),
                           settings.most_common(1)[0][0] if settings else "none"))
    return out


def overfit(on_tuning: list[SweepRow], on_validation: list[SweepRow]) -> tuple[float, float]:
    """The mean target and other change rate of the same settings on the tuning images minus on validation."""
    return (mean(t.target_change_rate - v.target_change_rate for t, v in zip(on_tuning, on_validation)),
            mean(t.other_change_rate - v.other_change_rate for t, v in zip(on_tuning, on_validation)))


def unchosen_gap(reports: list[ClassReport]) -> tuple[float, float]:
    """Per class, the mean target and other change rate of the configured rule's validation sweep settings on the
    tuning images minus on validation (none of them chosen); the means over the classes."""
    per_class = []
    for r in evaluated(reports):
        on_tuning = {row.setting: row for row in (r.tuning.sweep if r.tuning is not None else ())}
        pairs = [(on_tuning[row.setting], row) for row in r.dose_response if row.setting in on_tuning]
        if pairs:
            per_class.append(overfit(*zip(*pairs)))
    return mean(t for t, _ in per_class), mean(o for _, o in per_class)


def configured_words(reports: list[ClassReport]) -> str:
    """The configured setting(s) of the evaluated classes in words."""
    return "; ".join(sorted({describe_setting(r.setting) for r in evaluated(reports)})) or "none"


def study_summary(reports: list[ClassReport], rows: list[SummaryRow], counts: list[SettingCount],
                  rules: tuple[str, ...], n_stale: int) -> StudySummary:
    """The summary's figures (counts at the configured and tuned settings, the most common tuned setting, means of
    TPP scores, change rates and IoU, the oracle diagnostic), its sentence and its tables per rule and setting."""
    tuned = [row.tuned for row in rows if row.tuned is not None]
    gap = overfit([r.tuning.chosen for r in evaluated(reports) if r.tuned is not None], [t.patch for t in tuned])
    with_best = [r for r in evaluated(reports) if r.tuned_best is not None]
    best = [r.tuned_best for r in with_best]
    best_gap = overfit([r.tuning.best for r in with_best], best)
    unchosen = unchosen_gap(reports)
    common = Counter(t.setting for t in tuned).most_common(1)
    _, oracle_words = oracle(counts)
    figures = SummaryFigures(
        n_classes_evaluated=len(rows), n_specific=sum(row.configured.specific for row in rows),
        n_specific_ci=count_interval([row.configured.patch for row in rows]),
        n_specific_tuned=sum(t.specific for t in tuned),
        n_specific_tuned_ci=count_interval([t.patch for t in tuned]), n_tuned=len(tuned),
        tuned=common[0][0] if common else None, n_classes_at_common_tuned_setting=common[0][1] if common else 0,
        n_absent_from_validation=sum(r.status == "absent_from_validation" for r in reports),
        n_without_latents=sum(r.status == "no_latents" for r in reports),
        mean_tpp_score=mean(row.configured.tpp_score for row in rows),
        mean_tuned_tpp_score=mean(t.tpp_score for t in tuned),
        mean_target_change_rate=mean(row.configured.patch.target_change_rate for row in rows),
        mean_other_change_rate=mean(row.configured.patch.other_change_rate for row in rows),
        mean_random_latents_target_change_rate=mean(row.configured.patch.random_latents.target_change_rate
                                                    for row in rows),
        mean_random_direction_target_change_rate=mean(row.configured.patch.random_direction.target_change_rate
                                                      for row in rows),
        mean_tuned_target_change_rate=mean(t.patch.target_change_rate for t in tuned),
        mean_tuned_other_change_rate=mean(t.patch.other_change_rate for t in tuned),
        mean_tuned_target_gap=gap[0], mean_tuned_other_gap=gap[1],
        n_specific_best=sum(bool(b.specific) for b in best), n_specific_best_ci=count_interval(best),
        mean_best_target_change_rate=mean(b.target_change_rate for b in best),
        mean_best_other_change_rate=mean(b.other_change_rate for b in best),
        mean_best_target_gap=best_gap[0], mean_best_other_gap=best_gap[1],
        mean_unchosen_target_gap=unchosen[0], mean_unchosen_other_gap=unchosen[1],
        mean_target_iou_before=mean(row.configured.pixels.target_iou_before for row in rows),
        mean_target_iou_after=mean(row.configured.pixels.target_iou_after for row in rows),
        n_specific_oracle=upper_bound(reports), oracle_setting=oracle_words,
        configured_setting=configured_words(reports),
        n_stale=n_stale)
    return StudySummary(summary_sentence(figures), figures, tuple(rule_rows(reports, rules)), tuple(counts))


def class_rows(reports: list[ClassReport]) -> list[ClassRow]:
    """One row of the classes table per evaluated class."""
    rows = []
    for r in evaluated(reports):
        m, t = r.configured, r.tuned
        nan, none = float("nan"), Interval(float("nan"), float("nan"))
        p, lat, dir_ = m.patch, m.patch.random_latents, m.patch.random_direction
        rows.append(ClassRow(
            r.class_key, r.class_name, r.target_patches, p.target_change_rate, p.target_change_rate_ci or none,
            p.other_change_rate, p.other_change_rate_ci or none, lat.target_change_rate,
            lat.target_change_rate_ci or none, dir_.target_change_rate, dir_.target_change_rate_ci or none,
            m.pixels.target_iou_before, m.pixels.target_iou_after, m.tpp_score, m.specific, tuned_words(t),
            t.patch.target_change_rate if t else nan, (t.patch.target_change_rate_ci if t else None) or none,
            t.patch.other_change_rate if t else nan, (t.patch.other_change_rate_ci if t else None) or none,
            t.specific if t else None))
    return rows


def specificity_grid(reports: list[ClassReport], rules: tuple[str, ...]) -> SpecificityGrid:
    """Classes by settings for the heatmap: the validation sweep at the configured N (one column per scale and mode,
    with controls and verdicts), then each rule's own tuned setting measured on validation."""
    classes = evaluated(reports)
    sweep = sorted({(row.setting.mode, row.setting.scale) for r in classes for row in r.dose_response
                    if row.specific is not None}, key=lambda ms: (ms[0] != "every_token", ms[0], ms[1]))
    modes = [mode for mode, _ in sweep]
    groups = [(f"{mode.replace('_', ' ')}, scale x max", modes.index(mode), len(modes) - modes[::-1].index(mode))
              for mode in dict.fromkeys(modes)]
    groups.append(("tuned, per rule", len(sweep), len(sweep) + len(rules)))
    specific, target, other, unmet = [], [], [], []
    for r in classes:
        cells = {(row.setting.mode, row.setting.scale): row for row in r.dose_response if row.specific is not None}
        found = [cells.get(setting) for setting in sweep] + [r.tuned_per_rule.get(rule) for rule in rules]
        specific.append(tuple(None if c is None else bool(c.specific) for c in found))
        target.append(tuple(None if c is None else c.target_change_rate for c in found))
        other.append(tuple(None if c is None else c.other_change_rate for c in found))
        unmet.append(tuple(None if c is None else row_unmet(c, r.config) for c in found))
    configured = {(r.setting.mode, r.setting.scale) for r in classes}
    n = classes[0].setting.n_latents if classes else 0
    return SpecificityGrid(tuple(r.class_key for r in classes), tuple(f"{scale:g}" for _, scale in sweep) + rules,
                           tuple(groups), tuple(specific), tuple(target), tuple(other), tuple(unmet),
                           sweep.index(configured.pop()) if len(configured) == 1 and configured <= set(sweep) else -1,
                           f"class-specific or not, on validation: the sweep at N = {n} latents, then each rule's "
                           "tuned setting")


def row_unmet(row: SweepRow, config) -> str:
    """The first criterion of the specificity rule a row with controls fails ("" if it is class-specific)."""
    return unmet_criterion(row.target_change_rate, row.other_change_rate,
                           [row.random_latents.target_change_max, row.random_direction.target_change_max], config)
