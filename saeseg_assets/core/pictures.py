"""PNG figures for Dagster metadata and reports: small, headless (Agg), returned as bytes.

Each figure function takes plain arrays/tables and returns PNG bytes; `png_markdown` embeds one in metadata.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def figure_png(fig, dpi: int = 100) -> bytes:
    """Renders and closes a matplotlib figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """Markdown that shows the PNG inline (the Dagster UI renders data URIs in markdown metadata)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
