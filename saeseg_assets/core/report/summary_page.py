"""The suppression study as one HTML page to send to someone who does not run Dagster: the headline, the tables and
every picture of the summary and of each evaluated class, the absent classes with their reasons."""

from __future__ import annotations

from .html import (
    facts_table,
    figures_table,
    folded,
    heading,
    html_page,
    html_table,
    markdown_html,
    paragraph,
    png_img,
)
from .mechanisms import mechanism_note
from .records import flat
from .results import ClassReport, ClassRow, RuleRow, SettingCount, StudySummary
from .tables import record_markdown
from .text import CLASS_TABLE_NOTE, SWEEP_MARK, report_markdown

# 2: what it is made from, each class's table before its pictures; 3: the sweep and the gallery folded.
FORMAT_VERSION = 4  # of report.html (4: the trade-off picture)

REPORT_HTML = "report.html"
# Picture names of the summary and of a class, with their headings in the page.
SUMMARY_PICTURES = {"specificity": "Class-specific or not, by setting", "class_examples": "One example per class",
                    "change_rates": "Change rates per class", "specific_per_setting": "Class-specific classes per "
                    "validation setting (chosen on the images counted: optimistic)"}
CLASS_PICTURES = {"examples": "Examples", "tradeoff": "Target against other change, every validation setting",
                  "dose_response": "Dose-response", "latent_count": "Number of latents",
                  "gallery": "Top training patches of its latents"}
FOLDED_PICTURES = {"gallery"}  # a class's pictures shown on a click, with its validation sweep
PHOTOS = {"class_examples", "examples", "gallery"}  # inlined as JPEG: a fraction of the size, as sharp to the eye


def summary_html(summary: StudySummary, rows: list[ClassRow], pictures: dict[str, bytes], reports: list[ClassReport],
                 class_pictures: dict[str, dict[str, bytes]], provenance: dict[str, str] | None = None,
                 mechanisms: list[str] | None = None, propagated: dict[str, list[str]] | None = None) -> str:
    """`rows`: the classes table; `pictures`: by the names of SUMMARY_PICTURES; `class_pictures`: per class key,
    pictures by the names of CLASS_PICTURES; `provenance`: where the numbers come from, item -> words;
    `mechanisms`: the section comparing the mechanisms; `propagated`: per class key, its section under propagate."""
    evaluated = [r for r in reports if r.evaluated]
    others = [r for r in reports if not r.evaluated]
    body = [heading(1, "SAE class suppression: summary"), paragraph(summary.result, "headline")]
    if provenance:
        body += [heading(2, "What this is made from"),
                 facts_table(provenance)]
    body += [
            "<nav>" + " ".join(f'<a href="#{r.class_key}">{r.class_key}</a>' for r in evaluated) + "</nav>",
            heading(2, f"Evaluated classes ({len(evaluated)})"),
            paragraph(f"Click a column heading to sort. {CLASS_TABLE_NOTE}.", "muted"),
            markdown_html(record_markdown(rows, ClassRow))]
    if evaluated:
        body.append(paragraph(f"Rule: {evaluated[0].specificity_rule}.", "muted"))
    body += [heading(2, "Per ranking rule, each at its own tuned setting (validation)"),
             markdown_html(record_markdown(summary.per_rule, RuleRow)),
             heading(2, "Per validation setting"), markdown_html(record_markdown(summary.per_setting, SettingCount))]
    for name, title in SUMMARY_PICTURES.items():
        if name in pictures:
            body += [heading(2, title), png_img(pictures[name], title, name in PHOTOS)]
    body += [heading(2, "Figures"), figures_table(flat(summary.figures))]
    body += mechanisms or []
    for report in evaluated:
        key = report.class_key
        # The sentence and its table of both settings with intervals, the pictures, then the long sweep.
        sentence, details = report_markdown(report).split("\n", 1)
        settings, sweep = details.split(SWEEP_MARK, 1) if SWEEP_MARK in details else (details, "")
        body += [heading(2, f"{key}: {report.class_name}", key),
                 paragraph(mechanism_note(report.config.mechanism), "muted"), paragraph(sentence),
                 markdown_html(settings)]
        shown = {name: [heading(3, title), png_img(class_pictures[key][name], f"{key} {title}", name in PHOTOS)]
                 for name, title in CLASS_PICTURES.items() if name in class_pictures.get(key, {})}
        body += [fragment for name, fragments in shown.items() if name not in FOLDED_PICTURES
                 for fragment in fragments]
        more = [fragment for name in FOLDED_PICTURES & shown.keys() for fragment in shown[name]]
        if sweep:
            more.append(markdown_html(SWEEP_MARK + sweep))
        if more:
            body.append(folded(f"{key}: its latents' top training patches and the whole validation sweep", more))
        body += (propagated or {}).get(key, [])
    if others:
        body += [heading(2, f"Classes not evaluated ({len(others)})"),
                 html_table([{"class": r.class_key, "name": r.class_name, "status": r.status, "reason": r.reason}
                             for r in others])]
    return html_page("SAE class suppression: summary", body)
