"""The gallery of a class's latents: each latent's top-activating training patches, cropped with some context and the
patch outlined, one row per latent. Returns PNG bytes (see `pictures`)."""

from __future__ import annotations

import numpy as np

from .pictures import figure_png, plt

FORMAT_VERSION = 1  # of gallery.png


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
    fig, axes = plt.subplots(max(len(rows), 1), n_cols, figsize=(1.7 * n_cols, 1.95 * max(len(rows), 1)),
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
                ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=9)
            else:
                ax.imshow(crop)
                ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="red", linewidth=1.5))
            ax.set_title(caption, fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=10)
    if not rows:
        axes[0][0].text(0.5, 0.5, "no latents", ha="center", va="center")
        axes[0][0].axis("off")
    fig.suptitle(title, fontsize=11)
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
