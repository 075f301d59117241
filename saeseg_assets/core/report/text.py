"""What the suppression reports say in words: a setting, a class's sentence and account (its settings and sweep as
markdown tables), the examples' settings, and the summary's headline sentence."""

from __future__ import annotations

from .results import (
    CLASSES,
    CLASSES_TUNED,
    NOT_TUNED,
    ClassReport,
    Measured,
    Setting,
    SummaryFigures,
    SweepRow,
)
from ..study.measures import unmet_criterion
from .tables import count_text, markdown_table, rate_text

SWEEP_MARK = "Validation sweep of the "  # where a class's account turns from its settings to the long sweep
CLASS_TABLE_NOTES = {  # what the columns of each view of the classes table mean
    CLASSES: "target, other: share of the class's and of the other labelled patches whose prediction changed at the "
             "original setting, with 95% bootstrap intervals over validation images; rand. latents, rand. direction: "
             "the target change rate under the two controls; IoU at pixel level; TPP: targeted probe perturbation "
             "score",
    CLASSES_TUNED: "tuned setting: chosen per class on held-out training images, never validation; tuned target, "
                   "tuned other: the change rates it gives on validation, with 95% bootstrap intervals over images; "
                   "tuned specific: the verdict there"}
CLASS_TABLE_NOTE = "; ".join(CLASS_TABLE_NOTES.values())  # the whole table's


def describe_setting(setting: Setting) -> str:
    where = "every token" if setting.mode == "every_token" else "the tokens where they fire"
    n = setting.n_latents
    return f"{setting.scale:g} x max on {where}, {n} latent{'s' * (n != 1)} by {setting.rule}"


def failed_criterion(measured: Measured, config) -> str:
    """Why a setting is not class-specific, as the rule's first unmet criterion with its numbers; "" if it is."""
    p = measured.patch
    target, other = p.target_change_rate, p.other_change_rate
    controls = {"random latents": p.random_latents.target_change_max,
                "random direction": p.random_direction.target_change_max}
    unmet, t = unmet_criterion(target, other, list(controls.values()), config), rate_text(target, None)
    if unmet == "undefined":
        return "a rate is undefined"
    if unmet == "target":
        return f"target {t} < {config.min_target_change:g}"
    if unmet == "other":
        return f"target {t} < {config.other_factor:g} x other {rate_text(other, None)}"
    if unmet == "control":
        name, largest = max(controls.items(), key=lambda kv: kv[1])
        return f"target {t} < {config.control_factor:g} x the largest {name} draw {rate_text(largest, None)}"
    return ""


def criteria_words(config) -> str:
    """The heatmap's letters for the criterion a setting fails (measures.unmet_criterion), with the rule's numbers."""
    return (f"T target < {config.min_target_change:g}, O target < {config.other_factor:g} x other, "
            f"C target < {config.control_factor:g} x a control draw")


def example_words(report: ClassReport) -> dict[str, str]:
    """configured (and tuned) -> the setting in words, as the examples picture names them."""
    words = {"configured": describe_setting(report.setting)}
    if report.tuned is not None:
        words["tuned"] = describe_setting(report.tuned.setting)
    return words


def _verdict(measured: Measured, config) -> str:
    return "class-specific" if measured.specific else f"not class-specific ({failed_criterion(measured, config)})"


def class_sentence(report: ClassReport) -> str:
    """One line that says what happened to this class, at the configured and the tuned setting."""
    if report.configured is None:
        return f"{report.class_name}: {report.reason}."
    m = report.configured
    sentence = (f"{report.class_name}: at the original setting ({describe_setting(report.setting)}) "
                f"{_verdict(m, report.config)}: "
                f"{rate_text(m.patch.target_change_rate, m.patch.target_change_rate_ci)} of its patches changed "
                f"prediction against {rate_text(m.patch.other_change_rate, m.patch.other_change_rate_ci)} of the "
                f"others (random latents {_control_text(m.patch.random_latents)}, random direction "
                f"{_control_text(m.patch.random_direction)})")
    if report.tuned is None:
        reason = report.tuning.reason if report.tuning is not None else "not tuned"
        return f"{sentence}; no tuned setting ({reason})."
    t = report.tuned
    return (f"{sentence}; at the setting tuned on held-out training images ({describe_setting(t.setting)}) "
            f"{_verdict(t, report.config)}: {rate_text(t.patch.target_change_rate, t.patch.target_change_rate_ci)} "
            f"against "
            f"{rate_text(t.patch.other_change_rate, t.patch.other_change_rate_ci)}.")


def _control_text(control) -> str:
    return rate_text(control.target_change_rate, control.target_change_rate_ci)


def dose_markdown(rows: tuple[SweepRow, ...]) -> str:
    """The validation sweep, one row per setting; controls and verdict where measured."""
    if not rows:
        return "(no dose-response)"

    def control_max(control) -> float | None:
        return control.target_change_max if control is not None else None

    return markdown_table([{"N": r.setting.n_latents, "mode": r.setting.mode, "scale": r.setting.scale,
                            "target change": r.target_change_rate, "other change": r.other_change_rate,
                            "target patch acc.": r.target_patch_accuracy,
                            "rand. latents max": control_max(r.random_latents),
                            "rand. dir. max": control_max(r.random_direction), "specific": r.specific}
                           for r in rows])


def report_markdown(report: ClassReport) -> str:
    """One class's account: the sentence, the rule, both settings with intervals, and the validation sweep."""
    lines = [class_sentence(report)]
    if report.configured is None:
        return lines[0]
    settings = [("configured", report.configured)]
    if report.tuned is not None:
        settings.append((f"tuned: {describe_setting(report.tuned.setting)}", report.tuned))
    rows = []
    for label, m in settings:
        p = m.patch
        rows.append({"setting": label, "target": rate_text(p.target_change_rate, p.target_change_rate_ci),
                     "other": rate_text(p.other_change_rate, p.other_change_rate_ci),
                     "rand. lat. target": _control_text(p.random_latents),
                     "rand. lat. other": rate_text(p.random_latents.other_change_rate,
                                                   p.random_latents.other_change_rate_ci),
                     "rand. dir. target": _control_text(p.random_direction),
                     "rand. dir. other": rate_text(p.random_direction.other_change_rate,
                                                   p.random_direction.other_change_rate_ci),
                     "IoU change": rate_text(m.pixels.target_iou_change, m.pixels.target_iou_change_ci),
                     "TPP": m.tpp_score, "specific": m.specific})
    lines += ["", f"Rule: {report.specificity_rule}. Change rates are over patches (95% bootstrap intervals over "
              "validation images); IoU at pixel level.", "", markdown_table(rows),
              "", f"{SWEEP_MARK}{report.setting.rule} ranking (patch level; controls and verdict at "
              f"N = {report.setting.n_latents}):", "", dose_markdown(report.dose_response)]
    return "\n".join(lines)


def tuned_words(measured: Measured | None) -> str:
    return describe_setting(measured.setting) if measured is not None else NOT_TUNED


def summary_sentence(figures: SummaryFigures) -> str:
    """The summary in words, the counts first (with 95% intervals over resampled validation images)."""
    n, t = figures.n_classes_evaluated, figures.tuned
    tuned_text = (f"at settings tuned per class on held-out training images (most often {t.scale:g} x max, {t.mode}, "
                  f"{t.n_latents} latents by {t.rule}) "
                  f"{count_text(figures.n_specific_tuned, figures.n_specific_tuned_ci)} of {n}" if t is not None
                  else "no class could be tuned")
    return (f"At the original setting ({figures.configured_setting}) "
            f"{count_text(figures.n_specific, figures.n_specific_ci)} of {n} present classes are "
            f"class-specific (95% intervals over resampled validation images in brackets); {tuned_text}. Mean change "
            f"rates at the original setting: target {figures.mean_target_change_rate:.2f}, other patches "
            f"{figures.mean_other_change_rate:.2f}, random latents {figures.mean_random_latents_target_change_rate:.2f}"
            f", a random direction of the same norm {figures.mean_random_direction_target_change_rate:.2f}; at the "
            f"tuned settings target {figures.mean_tuned_target_change_rate:.2f}, other "
            f"{figures.mean_tuned_other_change_rate:.2f} (against "
            f"{figures.mean_tuned_target_change_rate + figures.mean_tuned_target_gap:.2f} and "
            f"{figures.mean_tuned_other_change_rate + figures.mean_tuned_other_gap:.2f} on the tuning images they "
            f"were chosen on){best_text(figures) if t is not None else ''}. "
            f"Mean TPP score {figures.mean_tpp_score:.2f} (original) and {figures.mean_tuned_tpp_score:.2f} "
            f"(tuned).")


def best_text(figures: SummaryFigures) -> str:
    """The tuning's plain best (the choice without the one-standard-error rule) on validation, against the tuning
    images: what the rule changed; and the gap of settings nobody chose."""
    f = figures
    return (f"; the best settings on the tuning images, before the one-standard-error rule: "
            f"{count_text(f.n_specific_best, f.n_specific_best_ci)} class-specific, target "
            f"{f.mean_best_target_change_rate:.2f}, other {f.mean_best_other_change_rate:.2f} (against "
            f"{f.mean_best_target_change_rate + f.mean_best_target_gap:.2f} and "
            f"{f.mean_best_other_change_rate + f.mean_best_other_gap:.2f} on the tuning images); the tuning "
            f"images minus validation for the sweep settings of the original rule, none of them chosen: target "
            f"{f.mean_unchosen_target_gap:.2f}, other {f.mean_unchosen_other_gap:.2f}")
