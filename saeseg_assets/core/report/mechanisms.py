"""The two mechanisms side by side: the classes studied under both (shortcut: the probe at the SAE's layer;
propagate: the edit through the rest of the ViT to the final-layer probe), their counts, a picture, the sentence
on where they disagree, and the words each class's page shows about which mechanism its figures come from."""

from __future__ import annotations

import math

import numpy as np

from ..study.measures import mean
from .html import heading, markdown_html, paragraph, png_img
from .pictures import plt, rates_per_class_png
from .results import ClassReport, MechanismComparison, MechanismRow, SweepRow
from .tables import markdown_table, rate_text
from .text import SWEEP_MARK, report_markdown

FORMAT_VERSION = 1  # of mechanisms.json, mechanisms.csv and mechanisms.png
MECHANISM_WORDS = {
    "shortcut": "shortcut: the edit at the SAE's layer taken straight into the probe on that layer (the seed's "
                "commands)",
    "propagate": "propagate: the edit at the SAE's layer carried through the rest of the ViT (later blocks, final "
                 "norm; CLS and registers unedited) to the probe on the final layer (the paper's demo)",
}
DISAGREE = 0.2  # a target change rate that differs by more than this between the mechanisms is named


def compare(shortcut: list[ClassReport], propagate: list[ClassReport]) -> MechanismComparison:
    """The classes evaluated under both mechanisms, in class order."""
    theirs = {r.class_key: r for r in propagate if r.configured is not None}
    rows = tuple(MechanismRow(r.class_key, r.class_name, r.configured.patch, theirs[r.class_key].configured.patch,
                              r.tuned.patch if r.tuned else None,
                              theirs[r.class_key].tuned.patch if theirs[r.class_key].tuned else None)
                 for r in sorted(shortcut, key=lambda r: r.class_index)
                 if r.configured is not None and r.class_key in theirs)

    def count(rows_: list[SweepRow | None]) -> int:
        return sum(bool(row is not None and row.specific) for row in rows_)

    counts = (count([r.shortcut for r in rows]), count([r.propagate for r in rows]),
              count([r.shortcut_tuned for r in rows]), count([r.propagate_tuned for r in rows]))
    studied = [r for r in shortcut if r.class_key in theirs] + [theirs[r.class_key] for r in shortcut
                                                                if r.class_key in theirs]
    return MechanismComparison(len(rows), *counts, _sentence(rows, studied, *counts), rows)


def _sentence(rows: tuple[MechanismRow, ...], reports: list[ClassReport], n_short: int, n_prop: int,
              n_short_tuned: int, n_prop_tuned: int) -> str:
    if not rows:
        return "No class has been studied under both mechanisms yet: materialize propagated_report."
    only_short = [r.class_key for r in rows if r.shortcut.specific and not r.propagate.specific]
    only_prop = [r.class_key for r in rows if r.propagate.specific and not r.shortcut.specific]
    far = [f"{r.class_key} ({rate_text(r.shortcut.target_change_rate)} vs {rate_text(r.propagate.target_change_rate)})"
           for r in rows if abs(r.shortcut.target_change_rate - r.propagate.target_change_rate) > DISAGREE]
    words = [f"Of {len(rows)} classes studied under both mechanisms, {n_short} are class-specific at the configured "
             f"setting under shortcut and {n_prop} under propagate (at each mechanism's tuned setting: {n_short_tuned} "
             f"and {n_prop_tuned}).",
             f"Mean target change rate {rate_text(mean(r.shortcut.target_change_rate for r in rows))} under shortcut, "
             f"{rate_text(mean(r.propagate.target_change_rate for r in rows))} under propagate; other patches "
             f"{rate_text(mean(r.shortcut.other_change_rate for r in rows))} and "
             f"{rate_text(mean(r.propagate.other_change_rate for r in rows))}."]
    if only_short or only_prop:
        words.append("The verdicts disagree on " + "; ".join(
            part for part in (f"{', '.join(only_short)} (specific under shortcut only)" if only_short else "",
                              f"{', '.join(only_prop)} (specific under propagate only)" if only_prop else "")
            if part) + ".")
    else:
        words.append("The verdicts agree on every class.")
    seeds = {r.config.mechanism: r.config.control_seeds for r in reports}
    if len(set(seeds.values())) > 1:
        words.append(f"The controls' draws differ: {seeds.get('shortcut')} per control under shortcut, "
                     f"{seeds.get('propagate')} under propagate.")
    if far:
        words.append(f"The target change rates differ by more than {DISAGREE:g} (shortcut vs propagate) for "
                     f"{', '.join(far)}.")
    return " ".join(words)


def comparison_markdown(comparison: MechanismComparison) -> str:
    """Per class, the configured setting's target and other change rates with 95% intervals and the verdict under
    each mechanism."""
    def cells(row: SweepRow, name: str) -> dict:
        return {f"{name} target": rate_text(row.target_change_rate, row.target_change_rate_ci),
                f"{name} other": rate_text(row.other_change_rate, row.other_change_rate_ci),
                f"{name} specific": bool(row.specific)}

    return markdown_table([{"class": r.class_key, **cells(r.shortcut, "shortcut"), **cells(r.propagate, "propagate")}
                           for r in comparison.rows])


def comparison_png(comparison: MechanismComparison, title: str) -> bytes:
    """Per class at the configured setting: target (circles) and other (squares) change rates with 95% intervals,
    shortcut on the left of each class, propagate on the right; filled where class-specific."""
    rows = comparison.rows
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2.5), 4.4))
    x = np.arange(len(rows))
    for offset, name, colour in ((-0.15, "shortcut", "tab:red"), (0.15, "propagate", "tab:green")):
        patch = [getattr(r, name) for r in rows]
        for rate, marker, what in (("target_change_rate", "o", "target"), ("other_change_rate", "s", "other")):
            values = np.array([getattr(p, rate) for p in patch], dtype=float)
            cis = [getattr(p, rate + "_ci") for p in patch]
            low = np.array([c.low if c is not None and math.isfinite(c.low) else v for c, v in zip(cis, values)])
            high = np.array([c.high if c is not None and math.isfinite(c.high) else v for c, v in zip(cis, values)])
            filled = [colour if (p.specific and what == "target") else "none" for p in patch]
            ax.errorbar(x + offset, values, yerr=[values - low, high - values], fmt="none", ecolor=colour,
                        alpha=0.6, capsize=2)
            ax.scatter(x + offset, values, marker=marker, edgecolors=colour, facecolors=filled, zorder=3,
                       label=f"{name}: {what}")
    return rates_per_class_png(fig, ax, [r.class_key for r in rows],
                               title + "\n(95% intervals; filled circle: class-specific)")


def mechanism_note(mechanism: str) -> str:
    """What a class's figures are measured under, in words."""
    return f"Mechanism of the figures and pictures that follow: {MECHANISM_WORDS[mechanism]}."


def propagated_class_html(report: ClassReport, examples_png: bytes | None) -> list[str]:
    """A class's page section under propagate: the mechanism in words, its sentence and table of the configured and
    tuned settings with controls and intervals, its examples."""
    sentence, details = (report_markdown(report).split("\n", 1) + [""])[:2]
    settings = details.split(SWEEP_MARK, 1)[0]
    body = [heading(3, f"{report.class_key} under propagate"), paragraph(mechanism_note("propagate"), "muted"),
            paragraph(sentence), markdown_html(settings)]
    if examples_png is not None:
        body.append(png_img(examples_png, f"{report.class_key} examples (propagate)", photo=True))
    return body
