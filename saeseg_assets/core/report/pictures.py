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


def rates_per_class_png(fig, ax, keys: list[str], title: str) -> bytes:
    """Finishes and renders a plot of change rates per class (0 to 1, one tick per class key, legend outside)."""
    ax.set_xticks(range(len(keys)), keys, rotation=60, ha="right", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("share of patches changed", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return figure_png(fig)


def png_markdown(png: bytes, alt: str) -> str:
    """Markdown that shows the PNG inline (the Dagster UI renders data URIs in markdown metadata)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def sweep_heatmap_png(lrs: list[float], weight_decays: list[float], score_LW, title: str = "held-out mIoU") -> bytes:
    """Heat map of a learning-rate x weight-decay sweep; `score_LW[i][j]` belongs to lrs[i], weight_decays[j]."""
    import numpy as np

    score = np.asarray(score_LW, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(weight_decays), 0.8 + 0.45 * len(lrs)))
    image = ax.imshow(score, cmap="viridis", aspect="auto", vmin=np.nanmin(score) if np.isfinite(score).any() else 0)
    ax.set_xticks(range(len(weight_decays)), [f"{wd:g}" for wd in weight_decays])
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_xlabel("weight decay")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=9)
    best = np.unravel_index(np.nanargmax(score), score.shape) if np.isfinite(score).any() else None
    low, high = image.get_clim()
    for (i, j), value in np.ndenumerate(score):
        # Dark text on the bright (yellow) end of viridis, light text on the dark end.
        bright = np.isfinite(value) and value > (low + high) / 2
        ax.text(j, i, "nan" if np.isnan(value) else f"{value:.3f}", ha="center", va="center", fontsize=7,
                color="black" if bright else "white", fontweight="bold" if (i, j) == best else "normal")
    fig.colorbar(image, ax=ax, fraction=0.05)
    return figure_png(fig)


def class_iou_bars_png(names: list[str], ious: list[float], title: str = "per-class IoU") -> bytes:
    """Horizontal bars of per-class IoU, in the order given; long lists grow the figure downwards."""
    fig, ax = plt.subplots(figsize=(5, 0.6 + 0.22 * max(len(names), 1)))
    positions = list(range(len(names)))
    ax.barh(positions, ious, color="tab:blue")
    ax.set_yticks(positions, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.set_title(title, fontsize=9)
    for y, value in zip(positions, ious):
        ax.text(min(value, 1.0) + 0.01, y, f"{value:.2f}", va="center", fontsize=6)
    return figure_png(fig)


def training_curve_png(history: list[dict], title: str = "SAE training") -> bytes:
    """Loss, batch FVU and L0 against tokens seen, one panel each; `history` rows hold tokens, loss, fvu, l0."""
    tokens = [row["tokens"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.6))
    for ax, name, label in zip(axes, ("loss", "fvu", "l0"), ("loss", "FVU (training batches)", "L0")):
        ax.plot(tokens, [row[name] for row in history], marker="." if len(tokens) < 30 else None)
        ax.set_xlabel("tokens")
        ax.set_title(label, fontsize=9)
        if name in ("loss", "fvu") and all(row[name] > 0 for row in history):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)
