"""One self-contained HTML page from text, tables and PNG pictures: pictures inlined as data URIs, styles and the
small table-sorting script inline, so the file opens offline and can be sent as it is."""

from __future__ import annotations

import base64
import html
import io
import math

from .tables import markdown_table

STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin-top: 1.6em; }
.headline { font-size: 1.15em; background: #f3f6fa; border-left: 4px solid #4a78b5; padding: 0.8em 1em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #eef1f5; cursor: pointer; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
nav a { margin-right: 0.8em; } .muted { color: #666; }
details { margin: 0.8em 0; } summary { cursor: pointer; color: #2a5a9a; }
table.facts td, table.facts th { text-align: left; vertical-align: top; } table.facts th { cursor: default; }
"""
# Click a column heading to sort by it (numbers as numbers); click again to reverse.
SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th, i) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], rows = Array.from(body.rows);
  const up = th.dataset.up !== "1"; th.dataset.up = up ? "1" : "0";
  const key = r => { const t = r.cells[i].textContent.trim(), n = parseFloat(t); return isNaN(n) ? t : n; };
  rows.sort((a, b) => { const x = key(a), y = key(b);
    return (typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : typeof x === "number" ? -1 : 1) * (up ? 1 : -1); });
  rows.forEach(r => body.appendChild(r));
}));
"""


def png_img(png: bytes, alt: str, photo: bool = False) -> str:
    """The picture inlined; `photo`: re-encoded as JPEG, about 5x smaller for pictures made of photographs."""
    mime = "image/png"
    if photo:
        from PIL import Image

        buffer = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="JPEG", quality=85)
        png, mime = buffer.getvalue(), "image/jpeg"
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{base64.b64encode(png).decode()}">'


def html_table(rows, columns=None, headers=None) -> str:
    """A sortable table; cells formatted as in the metadata's markdown tables (4 significant digits, yes/no, -)."""
    return markdown_html(markdown_table(rows, columns, headers))


def markdown_html(text: str) -> str:
    """The markdown this project writes (paragraphs, pipe tables from `markdown_table`, data-URI images) as HTML."""
    out, table = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            out.append(_table_html(table))
            table = []
        if line.startswith("![") and "](data:" in line:
            alt, src = line[2:].split("](", 1)
            out.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}">')
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out)


def _cells(line: str) -> list[str]:
    cells, cell, escaped = [], "", False
    for char in line.strip()[1:-1]:
        if char == "|" and not escaped:
            cells.append(cell.strip())
            cell = ""
        elif char == "\\" and not escaped:
            escaped = True
            continue
        else:
            cell += char
        escaped = False
    return [*cells, cell.strip()]


def _table_html(lines: list[str]) -> str:
    head, rows = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    heads = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="sortable"><thead><tr>{heads}</tr></thead><tbody>\n{body}\n</tbody></table>'


def html_page(title: str, body: list[str]) -> str:
    """The page: `body` is a list of HTML fragments (headings, paragraphs, tables, images) in order."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + f"\n<script>{SCRIPT}</script>\n"
            "</body></html>\n")


def heading(level: int, text: str, anchor: str = "") -> str:
    ident = f' id="{html.escape(anchor)}"' if anchor else ""
    return f"<h{level}{ident}>{html.escape(text)}</h{level}>"


def folded(summary: str, fragments: list[str]) -> str:
    """Fragments shown when the reader opens them (a click on `summary`): long tables and pictures that only some
    readers want, so that the page stays short to scroll."""
    return f"<details><summary>{html.escape(summary)}</summary>\n" + "\n".join(fragments) + "\n</details>"


def paragraph(text: str, css: str = "") -> str:
    return f'<p class="{css}">{html.escape(text)}</p>' if css else f"<p>{html.escape(text)}</p>"


def figures_table(figures: dict) -> str:
    """Name-value pairs as a two-column table (NaN and None as -)."""
    rows = [{"figure": k, "value": "-" if v is None or (isinstance(v, float) and math.isnan(v)) else v}
            for k, v in figures.items()]
    return html_table(rows)


def facts_table(facts: dict[str, str]) -> str:
    """Item-text pairs as a two-column table read left to right (what a page is made from)."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    return f'<table class="facts"><tbody>{rows}</tbody></table>'
