"""Bilinear upsampling of patch logits (align_corners=False, weights as torch computes them) split into windows: all
pixels of a window mix the same four patches, so pixel predictions can be recomputed one window at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

PIXEL_BUDGET = 1 << 22  # pixel x candidate values held at once while mixing corners


def axis_geometry(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output position, the lower source index and the upper neighbour's weight, in float32 like torch."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.where(src < 0, np.float32(0), src).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, lam


@dataclass(frozen=True)
class WindowShape:
    """The positions whose windows share one pixel shape (first, inner and last rows/columns differ)."""

    positions_Q: torch.Tensor  # positions (i * grid + j) of this shape
    weights_Q4X: torch.Tensor  # per position, each corner's weight at each of the X pixels
    offsets_QX: torch.Tensor  # per position, each pixel's flat index within the crop


@dataclass(frozen=True)
class WindowGeometry:
    """Window (b, i, j) covers the pixels whose upsampling mixes patches rows i, i+1 and columns j, j+1 of image b
    (clamped at the last row/column); windows are numbered b * grid^2 + i * grid + j."""

    grid: int
    crop: int
    n_images: int
    corners_W4: torch.Tensor  # token ids of corners (i, j), (i, j+1), (i+1, j), (i+1, j+1)
    shapes: tuple[WindowShape, ...]
    shape_G: torch.Tensor  # shape of each position
    slot_G: torch.Tensor  # row of each position in its shape's tables

    @classmethod
    def build(cls, n_images: int, grid: int, crop: int) -> WindowGeometry:
        i0, lam = axis_geometry(grid, crop)
        starts, lengths = np.searchsorted(i0, np.arange(grid)), np.bincount(i0, minlength=grid)
        shapes, shape_G, slot_G = [], np.zeros(grid * grid, np.int64), np.zeros(grid * grid, np.int64)
        for rows, cols in sorted({(int(lengths[i]), int(lengths[j])) for i in range(grid) for j in range(grid)}):
            positions = [i * grid + j for i in range(grid) for j in range(grid)
                         if (lengths[i], lengths[j]) == (rows, cols)]
            weights, offsets = [], []
            for q, p in enumerate(positions):
                i, j = divmod(p, grid)
                wy1 = lam[starts[i]:starts[i] + rows][:, None]
                wx1 = lam[starts[j]:starts[j] + cols][None, :]
                wy0, wx0 = 1 - wy1, 1 - wx1
                weights.append(np.stack([(wy0 * wx0).ravel(), (wy0 * wx1).ravel(), (wy1 * wx0).ravel(),
                                         (wy1 * wx1).ravel()]))
                y, x = np.meshgrid(starts[i] + np.arange(rows), starts[j] + np.arange(cols), indexing="ij")
                offsets.append((y * crop + x).ravel())
                shape_G[p], slot_G[p] = len(shapes), q
            shapes.append(WindowShape(torch.tensor(positions), torch.from_numpy(np.stack(weights)).float(),
                                      torch.from_numpy(np.stack(offsets))))
        b, i, j = np.meshgrid(np.arange(n_images), np.arange(grid), np.arange(grid), indexing="ij")
        i1, j1 = np.minimum(i + 1, grid - 1), np.minimum(j + 1, grid - 1)
        base = b * grid * grid
        corners = np.stack([base + i * grid + j, base + i * grid + j1, base + i1 * grid + j, base + i1 * grid + j1],
                           axis=-1).reshape(-1, 4)
        return cls(grid, crop, n_images, torch.from_numpy(corners), tuple(shapes), torch.from_numpy(shape_G),
                   torch.from_numpy(slot_G))

    @property
    def n_windows(self) -> int:
        return len(self.corners_W4)

    def by_shape(self, windows_R: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(shape id, indices into windows_R) for each shape present."""
        shape_R = self.shape_G[windows_R % (self.grid * self.grid)]
        for s in range(len(self.shapes)):
            index = (shape_R == s).nonzero().squeeze(1)
            if len(index):
                yield s, index

    def rows(self, shape: int, windows_R: torch.Tensor) -> torch.Tensor:
        """Row of each window (all of `shape`) in per-shape tables laid out [image, slot]."""
        G = self.grid * self.grid
        return windows_R // G * len(self.shapes[shape].positions_Q) + self.slot_G[windows_R % G]

    def per_shape(self, values_BHW: torch.Tensor) -> list[torch.Tensor]:
        """A per-pixel map [B, crop, crop] regrouped as one table per shape: [B * positions, X], rows [image, slot]."""
        flat = values_BHW.reshape(len(values_BHW), -1)
        return [flat[:, s.offsets_QX.reshape(-1)].reshape(-1, s.offsets_QX.shape[1]) for s in self.shapes]


Values = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (indices into windows_R, classes [r, K]) -> [r, 4, K]


def contested_predictions(geo: WindowGeometry, windows_R: torch.Tensor, hi_RC: torch.Tensor, lo_RC: torch.Tensor,
                          values: Values, tolerance: float, margins: bool = False
                          ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Pixel predictions of windows no single class wins: (shape, indices into windows_R, class [r, X],
    margin bound [r, X] if `margins`) per group. Only candidate classes are mixed: a class whose best corner is
    below some class's worst corner never wins a pixel of the window. Classes are indices into hi/lo (0 = class 1)."""
    is_cand_RC = hi_RC >= lo_RC.amax(1, keepdim=True) - tolerance
    n_cand_R = is_cand_RC.sum(1)
    # The best corner of the classes left out bounds their value at every pixel of the window.
    outside_R = hi_RC.masked_fill(is_cand_RC, float("-inf")).amax(1) if margins else None
    for s, index in geo.by_shape(windows_R):
        X = geo.shapes[s].weights_Q4X.shape[2]
        # Windows grouped by candidate count, ascending, so one crowded window does not widen the others.
        order = index[torch.argsort(n_cand_R[index])]
        a = 0
        while a < len(order):
            size = max(1, PIXEL_BUDGET // (X * int(n_cand_R[order[a]])))
            size = max(1, PIXEL_BUDGET // (X * int(n_cand_R[order[min(a + size, len(order)) - 1]])))
            group = order[a:a + size]
            k = int(n_cand_R[group[-1]])
            # Ascending class order, so argmax ties go to the lower class as in metrics.pixel_predictions.
            cand_rK = hi_RC[group].topk(k, dim=1).indices.sort(dim=1).values
            v_rK4 = values(group, cand_rK).transpose(1, 2)
            pix_rKX = torch.bmm(v_rK4, geo.shapes[s].weights_Q4X[geo.slot_G[windows_R[group] % geo.grid ** 2]])
            if not margins:
                # max() rather than argmax(): far faster over a middle axis, same first-index ties.
                yield s, group, cand_rK.gather(1, pix_rKX.max(1).indices), None
            else:
                top = pix_rKX.topk(min(2, k), dim=1)
                second = top.values[:, 1] if k > 1 else torch.full_like(top.values[:, 0], float("-inf"))
                margin = top.values[:, 0] - torch.maximum(second, outside_R[group][:, None])
                yield s, group, cand_rK.gather(1, top.indices[:, 0]), margin
            a += len(group)

