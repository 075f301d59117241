"""Figures of the class-latent and suppression assets: latent galleries, prediction examples in a fixed ADE colour
palette, dose-response curves and the summary's headline plots. Each returns PNG bytes (see `pictures`)."""

from __future__ import annotations

import colorsys

import numpy as np

from .pictures import figure_png, plt


def ade_palette() -> np.ndarray:
    """151 RGB colours, the same on every run: 0 ("other") black, classes spread around the hue circle by the
    golden ratio with alternating lightness so neighbouring indices differ."""
    colours = np.zeros((151, 3), dtype=np.uint8)
    for c in range(1, 151):
        hue = (c * 0.618033988749895) % 1.0
        value = (0.95, 0.75, 0.55)[c % 3]
        saturation = (0.85, 0.6)[c % 2]
        colours[c] = np.round(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255).astype(np.uint8)
    return colours


def colourize(labels_HW: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    return (ade_palette() if palette is None else palette)[np.asarray(labels_HW, dtype=np.int64)]


def patch_crop(image_HW3: np.ndarray, patch: int, grid: int, patch_size: int, context: int = 2
               ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The patch with `context` patches around it (clipped at the border), and the patch's box in the crop."""
    row, col = divmod(patch, grid)
    top, left = max(0, row - context) * patch_size, max(0, col - context) * patch_size
    bottom = min(grid, row + context + 1) * patch_size
    right = min(grid, col + context + 1) * patch_size
    return image_HW3[top:bottom, left:right], (col * patch_size - left, row * patch_size - top, patch_size, patch_size)


def latent_gallery_png(rows: list[tuple[str, list[tuple[np.ndarray | None, tuple[int, int, int, int], str]]]],
                       title: str) -> bytes:
    """One row per latent: its label, then tiles (crop or None, patch box, caption) with the patch outlined."""
    n_cols = max([len(tiles) for _, tiles in rows] + [1])
    fig, axes = plt.subplots(max(len(rows), 1), n_cols, figsize=(1.5 * n_cols, 1.7 * max(len(rows), 1)),
                             squeeze=False)
    for r, (label, tiles) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(tiles):
                ax.axis("off")
                continue
            crop, (x, y, w, h), caption = tiles[c]
            if crop is None:
                ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=7)
            else:
                ax.imshow(crop)
                ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="red", linewidth=1.5))
            ax.set_title(caption, fontsize=6)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    if not rows:
        axes[0][0].text(0.5, 0.5, "no latents", ha="center", va="center")
        axes[0][0].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def suppression_examples_png(images: list[np.ndarray | None], before: list[np.ndarray], after: list[np.ndarray],
                             captions: list[str], title: str) -> bytes:
    """Per row: image | baseline prediction | suppressed prediction, in the ADE palette."""
    palette = ade_palette()
    n = max(len(before), 1)
    fig, axes = plt.subplots(n, 3, figsize=(6.3, 2.1 * n), squeeze=False)
    for r in range(len(before)):
        panels = [images[r], colourize(before[r], palette), colourize(after[r], palette)]
        names = [captions[r], "baseline prediction", "suppressed prediction"]
        for c, (panel, name) in enumerate(zip(panels, names)):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is None:
                ax.text(0.5, 0.5, "image unavailable", ha="center", va="center", fontsize=7)
            else:
                ax.imshow(panel)
            ax.set_title(name, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def dose_response_png(rows: list[dict], title: str) -> bytes:
    """Per mode, change rates and target patch accuracy against the scale, with both controls dashed."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(4.2 * max(len(modes), 1), 3), squeeze=False)
    series = [("target_change_rate", "target change", "tab:red", "-"),
              ("other_change_rate", "other change", "tab:blue", "-"),
              ("target_patch_accuracy", "target patch acc.", "tab:green", ":"),
              ("random_latents_target_change_rate", "rand. latents: target change", "tab:orange", "--"),
              ("random_direction_target_change_rate", "rand. direction: target change", "tab:purple", "--")]
    for ax, mode in zip(axes[0], modes):
        sub = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["scale"])
        scales = [r["scale"] for r in sub]
        for key, label, colour, style in series:
            ax.plot(scales, [np.nan if r.get(key) is None else r[key] for r in sub], style, color=colour,
                    marker="o", markersize=3, label=label)
        for r in sub:
            if r.get("specific"):
                ax.axvline(r["scale"], color="grey", alpha=0.25, linewidth=6)
        ax.set_title(mode, fontsize=9)
        ax.set_xlabel("scale (x max activation)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of patches")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=6, frameon=False)
    fig.suptitle(title + " (grey band: class-specific)", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return figure_png(fig)


def change_rates_png(keys: list[str], target: list[float], other: list[float], random_latents: list[float],
                     random_direction: list[float], specific: list[bool], title: str) -> bytes:
    """Per class: target change rate (dot, filled when class-specific), other change rate, and both controls'
    target change rates, side by side."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(keys) + 2), 3.4))
    x = np.arange(len(keys))
    ax.scatter(x, target, color="tab:red", label="target change", zorder=3,
               facecolors=["tab:red" if s else "none" for s in specific])
    ax.scatter(x, other, color="tab:blue", marker="s", label="other change", zorder=3)
    ax.scatter(x, random_latents, color="tab:orange", marker="^", label="random latents: target", zorder=2)
    ax.scatter(x, random_direction, color="tab:purple", marker="v", label="random direction: target", zorder=2)
    ax.set_xticks(x, keys, rotation=70, fontsize=6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("share of patches changed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(title + " (filled: class-specific)", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def specific_counts_png(counts: list[dict], n_classes: int, title: str) -> bytes:
    """Number of class-specific classes against the scale, one line per mode."""
    fig, ax = plt.subplots(figsize=(4.5, 3))
    for mode in dict.fromkeys(r["mode"] for r in counts):
        sub = sorted((r for r in counts if r["mode"] == mode), key=lambda r: r["scale"])
        ax.plot([r["scale"] for r in sub], [r["n_specific"] for r in sub], marker="o", label=mode)
    ax.set_xlabel("scale (x max activation)")
    ax.set_ylabel(f"class-specific classes (of {n_classes})")
    ax.set_ylim(-0.3, max(n_classes, 1) + 0.3)
    ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if counts:
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def class_gallery_png(top_by_latent: list[tuple[int, list[tuple[int, int, float]]]], load_image, grid: int,
                      patch_size: int, title: str) -> bytes:
    """Gallery of each latent's top-activating training patches; `load_image(image index)` gives the RGB crop or
    None, `top_by_latent` lists (latent, [(image, patch, value), ...])."""
    rows = []
    for latent, tops in top_by_latent:
        tiles = []
        for image_index, patch, value in tops:
            image = load_image(image_index)
            if image is None:
                tiles.append((None, (0, 0, 0, 0), f"img {image_index} p{patch}: {value:.3g}"))
                continue
            crop, box = patch_crop(image, patch, grid, patch_size)
            tiles.append((crop, box, f"img {image_index} p{patch}: {value:.3g}"))
        rows.append((f"latent {latent}", tiles))
    return latent_gallery_png(rows, title)
