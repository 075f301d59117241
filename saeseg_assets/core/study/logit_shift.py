"""Exact probe predictions (patch and pixel level) after a shift of the logits, recomputing only the patches and
upsampling windows whose prediction a margin bound cannot prove unchanged; tested equal to the full recomputation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..probe.metrics import N_OUTPUTS, patch_predictions
from .windows import WindowGeometry, contested_predictions

# Margins below this share of the logit scale are treated as ties and recomputed, so float rounding in the
# shifted sum can never make a kept prediction differ from a recomputed one.
RELATIVE_TOLERANCE = 1e-5
CHUNK_VALUES = 1 << 22  # logit values held at once per image chunk
DENSE_SHARE = 0.25  # above this share of windows to recompute, pool the whole logit grid instead of gathering


@dataclass(frozen=True)
class LogitShift:
    """delta_n = shift_C on every token, except the tokens `rows_M`, whose whole delta is `deltas_MC`."""

    shift_C: torch.Tensor
    rows_M: torch.Tensor
    deltas_MC: torch.Tensor

    @classmethod
    def zero(cls, n_outputs: int = N_OUTPUTS) -> LogitShift:
        return cls(torch.zeros(n_outputs), torch.zeros(0, dtype=torch.int64), torch.zeros(0, n_outputs))

    def dense(self, tokens_T: torch.Tensor) -> torch.Tensor:
        """The delta of each token in `tokens_T`: [T, C]."""
        out_TC = self.shift_C.expand(len(tokens_T), -1).clone()
        where = torch.isin(tokens_T, self.rows_M)
        if where.any():
            position = torch.searchsorted(self.rows_M, tokens_T[where])
            out_TC[where] = self.deltas_MC[position]
        return out_TC


@dataclass(frozen=True)
class PatchBaseline:
    """Baseline logits with, per token, its prediction and its `TOP` best classes (ascending class order) with their
    logits: a shift that keeps one of those ahead of what any other class could reach is settled among them."""

    logits_NC: torch.Tensor
    pred_N: torch.Tensor
    top_classes_NK: torch.Tensor  # the TOP best of outputs 1..150, in ascending class order
    top_logits_NK: torch.Tensor  # their logits
    floor_N: torch.Tensor  # the TOP-th best logit: no class outside the TOP has more
    labels_N: torch.Tensor  # majority label of each patch (0 = other)
    tolerance: float

    TOP = 8

    @classmethod
    def build(cls, logits_NC: torch.Tensor, labels_N: torch.Tensor) -> PatchBaseline:
        top = logits_NC[:, 1:].topk(min(cls.TOP, logits_NC.shape[1] - 1), dim=1)
        classes_NK, order = (top.indices + 1).sort(dim=1)
        scale = float(logits_NC.abs().max()) if logits_NC.numel() else 0.0
        return cls(logits_NC, patch_predictions(logits_NC), classes_NK, top.values.gather(1, order),
                   top.values[:, -1], labels_N.long(), RELATIVE_TOLERANCE * (1.0 + scale))

    def predictions_after(self, shift: LogitShift) -> torch.Tensor:
        """argmax over 1..150 of logits + delta, per token."""
        pred_N = self.pred_N.clone()
        d_C = shift.shift_C
        if bool(d_C.any()):
            # Among a token's best classes, the first maximum of logit + d is the lowest class, as argmax gives it;
            # it stands when it beats what any class outside them can reach (floor + the largest shift).
            shifted_NK = self.top_logits_NK + d_C[self.top_classes_NK]
            best_N, position_N = shifted_NK.max(1)
            tol = self.tolerance + RELATIVE_TOLERANCE * float(d_C.abs().max())
            settled_N = best_N - (self.floor_N + d_C[1:].max()) > tol
            pred_N = torch.where(settled_N, self.top_classes_NK.gather(1, position_N[:, None])[:, 0], pred_N)
            redo = (~settled_N).nonzero().squeeze(1)
            if len(redo):
                pred_N[redo] = patch_predictions(self.logits_NC[redo] + d_C)
        if len(shift.rows_M):
            pred_N[shift.rows_M] = patch_predictions(self.logits_NC[shift.rows_M] + shift.deltas_MC)
        return pred_N


class _Csr:
    """Per window, a few (key, count) entries: label histograms, or (label, prediction) pair counts."""

    def __init__(self, window_E: torch.Tensor, key_E: torch.Tensor, n_windows: int):
        unique, count = torch.unique(window_E * (N_OUTPUTS ** 2) + key_E, return_counts=True)
        self.ptr = torch.zeros(n_windows + 1, dtype=torch.int64)
        self.ptr[1:] = torch.cumsum(torch.bincount(unique // (N_OUTPUTS ** 2), minlength=n_windows), 0)
        self.key, self.count = unique % (N_OUTPUTS ** 2), count

    def entries(self, windows_R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row in windows_R, key, count) of every entry of the given windows."""
        start, length = self.ptr[windows_R], self.ptr[windows_R + 1] - self.ptr[windows_R]
        row = torch.repeat_interleave(torch.arange(len(windows_R)), length)
        index = torch.repeat_interleave(start - (torch.cumsum(length, 0) - length), length) + torch.arange(len(row))
        return row, self.key[index], self.count[index]


@dataclass(frozen=True)
class PixelBaseline:
    """Baseline pixel predictions by upsampling window, with the margins that prove a window unchanged by a shift:
    a window one class wins outright keeps it while its margin exceeds what the shift can take from that class; a
    contested window keeps its pixels while, for each class it wins somewhere, its smallest pixel margin does."""

    geometry: WindowGeometry
    win_class_W: torch.Tensor  # class winning every pixel of the window, or -1 where contested
    win_margin_W: torch.Tensor  # worst corner of that class - best corner of any other class
    cont_window_E: torch.Tensor  # (contested window, class it wins at some pixel) entries:
    cont_class_E: torch.Tensor
    cont_margin_E: torch.Tensor  # the smallest margin bound over those pixels
    labels_S: list[torch.Tensor]  # pixel labels per window shape, [images x positions, pixels] (uint8)
    label_hist: _Csr  # per window: label -> pixel count (labels 1..150)
    base_pairs: _Csr  # per window: label * 151 + baseline prediction -> pixel count
    counts_KK: torch.Tensor  # baseline confusion counts
    tolerance: float

    @classmethod
    def build(cls, logits_NC: torch.Tensor, pixel_labels_BHW: torch.Tensor, pixel_pred_BHW: torch.Tensor,
              grid: int) -> PixelBaseline:
        n_images, crop = pixel_labels_BHW.shape[0], pixel_labels_BHW.shape[-1]
        geo = WindowGeometry.build(n_images, grid, crop)
        labels_S = geo.per_shape(pixel_labels_BHW.to(torch.uint8))
        windows, labels, pairs = [], [], []
        for shape, labels_RX, preds_RX in zip(geo.shapes, labels_S, geo.per_shape(pixel_pred_BHW.long())):
            ids = (torch.arange(n_images)[:, None] * grid * grid + shape.positions_Q[None]).reshape(-1)
            keep = labels_RX != 0
            windows.append(ids[:, None].expand_as(labels_RX)[keep])
            labels.append(labels_RX[keep].long())
            pairs.append(labels[-1] * N_OUTPUTS + preds_RX[keep])
        windows, labels, pairs = torch.cat(windows), torch.cat(labels), torch.cat(pairs)
        counts = torch.bincount(pairs, minlength=N_OUTPUTS ** 2).reshape(N_OUTPUTS, N_OUTPUTS)
        tolerance = RELATIVE_TOLERANCE * (1.0 + (float(logits_NC.abs().max()) if logits_NC.numel() else 0.0))
        win_class, win_margin, keys, margins = [], [], [], []
        step = max(1, CHUNK_VALUES // (4 * N_OUTPUTS))
        for a in range(0, geo.n_windows, step):
            chunk = torch.arange(a, min(a + step, geo.n_windows))
            corner_R4C = logits_NC[geo.corners_W4[chunk]][..., 1:]
            hi_RC, lo_RC = corner_R4C.amax(1), corner_R4C.amin(1)
            cls_R, margin_R = _best_class(hi_RC, lo_RC)
            contested = (margin_R <= tolerance).nonzero().squeeze(1)
            win_class.append(torch.where(margin_R <= tolerance, -1, cls_R + 1))
            win_margin.append(margin_R)
            sub = corner_R4C[contested]
            for _, group, pred, margin in contested_predictions(
                    geo, chunk[contested], hi_RC[contested], lo_RC[contested], _gatherer(sub), tolerance, True):
                keys.append((chunk[contested][group][:, None] * N_OUTPUTS + pred + 1).reshape(-1))
                margins.append(margin.reshape(-1))
        keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
        unique, inverse = torch.unique(keys, return_inverse=True)
        least = torch.full((len(unique),), float("inf")).scatter_reduce(
            0, inverse, torch.cat(margins) if margins else torch.zeros(0), reduce="amin")
        return cls(geo, torch.cat(win_class), torch.cat(win_margin), unique // N_OUTPUTS, unique % N_OUTPUTS, least,
                   labels_S, _Csr(windows, labels, geo.n_windows), _Csr(windows, pairs, geo.n_windows), counts,
                   tolerance)

    def counts_after(self, patch: PatchBaseline, shift: LogitShift,
                     per_image: ImageCounts | None = None) -> torch.Tensor:
        """Pixel confusion counts [151, 151] of the probe on logits + delta (bilinear upsampling, argmax 1..150).
        `per_image`, if given, receives the changes of its class's per-image counts (for bootstrap intervals)."""
        geo, d_C = self.geometry, shift.shift_C
        own_N = torch.zeros(len(patch.logits_NC), dtype=torch.bool)
        own_N[shift.rows_M] = True
        redo_W = own_N[geo.corners_W4].any(1)
        if bool(d_C.any()):
            # What a shift can take from class c's lead anywhere: max_c' d_c' - d_c.
            tol = self.tolerance + RELATIVE_TOLERANCE * float(d_C.abs().max())
            loss_C = d_C[1:].max() - d_C
            redo_W |= (self.win_class_W > 0) & (self.win_margin_W - loss_C[self.win_class_W.clamp(min=0)] <= tol)
            redo_W[self.cont_window_E[self.cont_margin_E - loss_C[self.cont_class_E] <= tol]] = True
        redo = redo_W.nonzero().squeeze(1)
        counts = self.counts_KK.clone().reshape(-1)
        G = geo.grid * geo.grid
        if len(redo):
            row, pair, count = self.base_pairs.entries(redo)
            counts.index_add_(0, pair, -count)
            if per_image is not None:
                per_image.add(redo[row] // G, pair // N_OUTPUTS, pair % N_OUTPUTS, -count)
        step = max(1, CHUNK_VALUES // (G * N_OUTPUTS))
        for a in range(0, geo.n_images, step):
            b = min(a + step, geo.n_images)
            windows = redo[(redo >= a * G) & (redo < b * G)]
            if not len(windows):
                continue
            if len(windows) > DENSE_SHARE * (b - a) * G:
                shifted_TC = _shifted_logits(patch, shift, a * G, b * G)
                hi_WC, lo_WC = _pooled_extremes(shifted_TC, b - a, geo.grid)
                hi_RC, lo_RC = hi_WC[windows - a * G], lo_WC[windows - a * G]
                corners_R4 = geo.corners_W4[windows] - a * G

                def values(index: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
                    return shifted_TC[corners_R4[index][:, :, None], classes[:, None, :]]
            else:
                tokens_R4 = geo.corners_W4[windows]
                corner_R4C = (patch.logits_NC[tokens_R4] + shift.dense(tokens_R4.reshape(-1)).reshape(
                    *tokens_R4.shape, -1))[..., 1:]
                hi_RC, lo_RC = corner_R4C.amax(1), corner_R4C.amin(1)
                values = _gatherer(corner_R4C)
            self._add_window_counts(counts, windows, hi_RC, lo_RC, values, per_image)
        return counts.reshape(N_OUTPUTS, N_OUTPUTS)

    def _add_window_counts(self, counts: torch.Tensor, windows_R: torch.Tensor, hi_RC: torch.Tensor,
                           lo_RC: torch.Tensor, values, per_image: ImageCounts | None) -> None:
        geo = self.geometry
        G = geo.grid * geo.grid
        cls_R, margin_R = _best_class(hi_RC, lo_RC)
        won = margin_R > self.tolerance
        # Windows one class wins outright: their whole label histogram goes to that class.
        row, label, count = self.label_hist.entries(windows_R[won])
        counts.index_add_(0, label * N_OUTPUTS + cls_R[won][row] + 1, count)
        if per_image is not None:
            per_image.add(windows_R[won][row] // G, label, cls_R[won][row] + 1, count)
        contested = (~won).nonzero().squeeze(1)
        if not len(contested):
            return
        windows = windows_R[contested]
        for s, group, pred, _ in contested_predictions(geo, windows, hi_RC[contested], lo_RC[contested],
                                                       lambda g, c: values(contested[g], c), self.tolerance):
            labels_rX = self.labels_S[s][geo.rows(s, windows[group])].long()
            new = torch.bincount((labels_rX * N_OUTPUTS + pred + 1).reshape(-1), minlength=N_OUTPUTS ** 2)
            new[:N_OUTPUTS] = 0  # label 0 ("other") is never scored
            counts += new
            if per_image is not None:
                labelled = labels_rX != 0
                image_rX = (windows[group] // G)[:, None].expand_as(labels_rX)
                per_image.add(image_rX[labelled], labels_rX[labelled], (pred + 1)[labelled],
                              torch.ones(int(labelled.sum()), dtype=torch.int64))


class ImageCounts:
    """Per image, one class's labelled pixels predicted as it (`pred_B`) and of those, labelled it (`tp_B`): started
    at the baseline, moved by `counts_after` as it recomputes windows. With `gt_B` (pixels labelled the class) they
    give the class's IoU over any resample of the images."""

    def __init__(self, class_index: int, pixel_labels_BHW: torch.Tensor, pixel_pred_BHW: torch.Tensor):
        self.class_index = class_index
        labels_BX = pixel_labels_BHW.reshape(len(pixel_labels_BHW), -1)
        pred_c_BX = (pixel_pred_BHW.reshape(len(pixel_pred_BHW), -1) == class_index) & (labels_BX != 0)
        self.gt_B = (labels_BX == class_index).sum(1)
        self.pred_B = pred_c_BX.sum(1)
        self.tp_B = (pred_c_BX & (labels_BX == class_index)).sum(1)

    def add(self, image_E: torch.Tensor, label_E: torch.Tensor, pred_E: torch.Tensor, count_E: torch.Tensor) -> None:
        hit = pred_E == self.class_index
        self.pred_B.index_add_(0, image_E[hit], count_E[hit])
        tp = hit & (label_E == self.class_index)
        self.tp_B.index_add_(0, image_E[tp], count_E[tp])


def _gatherer(corner_R4C: torch.Tensor):
    """values(index, classes) -> [r, 4, K] read from corner logits already gathered: [R, 4, 150]."""
    return lambda index, classes: corner_R4C[index].gather(2, classes[:, None, :].expand(-1, 4, -1))


def _shifted_logits(patch: PatchBaseline, shift: LogitShift, start: int, stop: int) -> torch.Tensor:
    """Logits + delta of tokens [start, stop), classes 1..150: [T, 150]."""
    logits_TC = patch.logits_NC[start:stop, 1:] + shift.shift_C[1:]
    own = (shift.rows_M >= start) & (shift.rows_M < stop)
    if own.any():
        rows = shift.rows_M[own]
        logits_TC[rows - start] = patch.logits_NC[rows, 1:] + shift.deltas_MC[own, 1:]
    return logits_TC


def _pooled_extremes(logits_TC: torch.Tensor, n_images: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and min over each window's four corners, [W, 150] each, from the edge-padded logit grid: cheaper than
    gathering corners when most windows are needed."""
    grid_BggC = logits_TC.reshape(n_images, grid, grid, -1)
    padded = torch.cat([grid_BggC, grid_BggC[:, -1:]], 1)
    padded = torch.cat([padded, padded[:, :, -1:]], 2)
    corners = (padded[:, :-1, :-1], padded[:, :-1, 1:], padded[:, 1:, :-1], padded[:, 1:, 1:])
    hi = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))
    lo = torch.minimum(torch.minimum(corners[0], corners[1]), torch.minimum(corners[2], corners[3]))
    return hi.reshape(-1, hi.shape[-1]), lo.reshape(-1, lo.shape[-1])


def _best_class(hi_RC: torch.Tensor, lo_RC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window, the class with the best worst corner, and its margin over every other class's best corner."""
    lo_best_R, cls_R = lo_RC.max(1)
    return cls_R, lo_best_R - hi_RC.scatter(1, cls_R[:, None], float("-inf")).amax(1)
