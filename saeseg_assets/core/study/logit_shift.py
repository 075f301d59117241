"""Exact probe predictions (patch and pixel level) after a shift of the logits, recomputing only the patches and
upsampling windows whose prediction a margin bound cannot prove unchanged; tested equal to the full recomputation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..probe.metrics import N_OUTPUTS, patch_predictions
from .windows import WindowGeometry, contested_predictions

# Margins below this share of the logit scale are treated as ties and recomputed, so float rounding in the
# shifted sum can never make a kept prediction differ from a recomputed one.
RELATIVE_TOLERANCE = 1e-5
CHUNK_VALUES = 1 << 22  # logit values held at once per image chunk
DENSE_SHARE = 0.25  # above this share of windows to recompute, pool the whole logit grid instead of gathering
SPARSE_SHARE = 0.05  # above this share of tokens as candidates, find them by one pass over the margins
SETTLE_BLOCK = 1 << 15  # candidate tokens settled at once
CACHE_VALUES = 1 << 18  # values per block of a row term's products: small enough to stay in the processor's cache


class RowTerm:
    """The part of some tokens' logit deltas that differs from token to token: coef_MR @ basis_RC (basis None: coef
    is the [M, C] term itself). Its values at each token's best baseline classes and its largest value over the
    classes are made once and kept: a latent set's term serves every scale of its edit."""

    def __init__(self, coef_MR: torch.Tensor, basis_RC: torch.Tensor | None = None):
        self.coef_MR, self.basis_RC = coef_MR, basis_RC
        self._top: tuple | None = None
        self.rows_terms: tuple | None = None  # kept by `PatchBaseline._row_terms` for the rows of one baseline
        self._at: dict = {}

    @property
    def kept_bytes(self) -> int:
        """What it keeps beyond its coefficients: its top values, its rows' terms, its values at the last classes."""
        return tensor_bytes(*(self._top or ()), *(self.rows_terms or ()), *self._at.values())

    def full(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The term's rows (those of `index`, or all): [M, C]."""
        return self._times_basis(self.coef_MR if index is None else self.coef_MR.index_select(0, index))

    def _times_basis(self, coef: torch.Tensor) -> torch.Tensor:
        return coef if self.basis_RC is None else coef @ self.basis_RC

    def at(self, classes_J: torch.Tensor) -> torch.Tensor:
        """The term at the same few classes on every row: [M, J] (the last class set's kept: every negative scale of
        an edit raises the same classes)."""
        key = tuple(classes_J.tolist())
        if key not in self._at:
            self._at = {key: self.coef_MR[:, classes_J] if self.basis_RC is None else
                        self.coef_MR @ self.basis_RC[:, classes_J]}
        return self._at[key]

    def top(self, classes_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(the term at `classes_MK` [M, K], its max over classes 1..150 [M], its largest magnitude)."""
        if self._top is None and self.basis_RC is not None and self.basis_RC.shape[0] == 1:
            # Rank one, a_m b_C: max_c a_m b_c is a_m max b or a_m min b by the sign of a_m.
            a_M, b_C = self.coef_MR[:, 0], self.basis_RC[0]
            hi, lo = (float(b_C[1:].max()), float(b_C[1:].min())) if len(b_C) > 1 else (0.0, 0.0)
            self._top = (a_M[:, None] * b_C[classes_MK.long()], torch.maximum(a_M * hi, a_M * lo),
                         float(a_M.abs().max()) * float(b_C.abs().max()) if len(a_M) else 0.0)
        if self._top is None:
            parts = []
            step = max(1, CACHE_VALUES // N_OUTPUTS)
            for a in range(0, len(self.coef_MR), step):
                own_mC = self._times_basis(self.coef_MR[a:a + step])
                parts.append((own_mC.gather(1, classes_MK[a:a + step].long()), own_mC[:, 1:].amax(1),
                              own_mC.abs().amax(1)))
            if parts:
                self._top = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                             float(torch.cat([p[2] for p in parts]).max()))
            else:
                self._top = (torch.zeros(0, classes_MK.shape[1]), torch.zeros(0), 0.0)
        return self._top


class LogitShift:
    """delta_n = shift_C on every token, except the tokens `rows_M` (ascending), whose delta is row_C + own_MC, own
    a `RowTerm`."""

    def __init__(self, shift_C: torch.Tensor, rows_M: torch.Tensor, row_C: torch.Tensor, own: RowTerm,
                 rows_memo: dict | None = None):
        self.shift_C, self.rows_M, self.row_C, self.own = shift_C, rows_M, row_C, own
        # Shared by shifts whose rows' deltas are the same (an edit's two modes at one scale): their predictions.
        self.rows_memo = {} if rows_memo is None else rows_memo
        self._deltas: torch.Tensor | None = None

    @classmethod
    def explicit(cls, shift_C: torch.Tensor, rows_M: torch.Tensor, deltas_MC: torch.Tensor) -> LogitShift:
        """A shift given by its rows' whole deltas."""
        return cls(shift_C, rows_M, torch.zeros_like(shift_C), RowTerm(deltas_MC))

    @classmethod
    def zero(cls, n_outputs: int = N_OUTPUTS) -> LogitShift:
        return cls.explicit(torch.zeros(n_outputs), torch.zeros(0, dtype=torch.int64), torch.zeros(0, n_outputs))

    @property
    def deltas_MC(self) -> torch.Tensor:
        """The rows' whole deltas [M, C] (made on first use)."""
        if self._deltas is None:
            self._deltas = self.row_C + self.own.full()
        return self._deltas

    def dense(self, tokens_T: torch.Tensor) -> torch.Tensor:
        """The delta of each token in `tokens_T`: [T, C]."""
        out_TC = self.shift_C.expand(len(tokens_T), -1).clone()
        where = torch.isin(tokens_T, self.rows_M)
        if where.any():
            position = torch.searchsorted(self.rows_M, tokens_T[where])
            out_TC[where] = self.row_C + self.own.full(position)
        return out_TC


@dataclass(frozen=True)
class PatchBaseline:
    """Baseline logits with, per token, its prediction, its margin over the runner-up and its `TOP` best classes, and
    the tokens sorted by (prediction, margin). A shift d moves a token predicted p only if its margin is at most
    max_{c != p} d_c - d_p: a binary search per class finds those few candidates, and only they are recomputed."""

    logits_NC: torch.Tensor
    pred_N: torch.Tensor
    top_classes_NK: torch.Tensor  # the TOP best of outputs 1..150, in ascending class order (uint8)
    top_logits_NK: torch.Tensor  # their logits
    pred_position_N: torch.Tensor  # where the prediction is among them (uint8)
    margin_N: torch.Tensor  # the prediction's logit minus the runner-up's
    floor_N: torch.Tensor  # the TOP-th best logit: no class outside the TOP has more
    labels_N: torch.Tensor  # majority label of each patch (0 = other)
    order_N: torch.Tensor  # tokens sorted by (prediction, margin)
    key_N: torch.Tensor  # float64: margin + prediction x span, ascending along order_N
    start_P: torch.Tensor  # [152]: class p's tokens are order_N[start_P[p]:start_P[p + 1]]
    span: float  # a power of two above every margin: keys of different classes never interleave
    tolerance: float

    TOP = 8

    @classmethod
    def build(cls, logits_NC: torch.Tensor, labels_N: torch.Tensor) -> PatchBaseline:
        # The best classes a block of tokens at a time: a top-k of the whole [N, 150] view would copy the logits.
        K, step = min(cls.TOP, logits_NC.shape[1] - 1), max(1, CHUNK_VALUES // N_OUTPUTS)
        blocks = [logits_NC[a:a + step, 1:].topk(K, dim=1) for a in range(0, len(logits_NC), step)]
        top_values = torch.cat([b.values for b in blocks]) if blocks else torch.zeros(0, K)
        top_indices = torch.cat([b.indices for b in blocks]) if blocks else torch.zeros(0, K, dtype=torch.int64)
        del blocks
        classes_NK, order = (top_indices + 1).sort(dim=1)
        del top_indices
        scale = largest_magnitude(logits_NC)
        pred_N = patch_predictions(logits_NC)
        margin_N = (top_values[:, 0] - top_values[:, 1]).double() if K > 1 else \
            torch.full((len(logits_NC),), math.inf, dtype=torch.float64)
        span = 2.0 ** math.ceil(math.log2(float(margin_N.max()) + 2.0)) if len(margin_N) else 1.0
        by_margin = torch.argsort(margin_N, stable=True)
        order_N = by_margin[torch.argsort(pred_N[by_margin], stable=True)]
        start_P = torch.zeros(N_OUTPUTS + 1, dtype=torch.int64)
        start_P[1:] = torch.cumsum(torch.bincount(pred_N, minlength=N_OUTPUTS), 0)
        position_N = (classes_NK == pred_N[:, None]).int().argmax(1).to(torch.uint8)
        return cls(logits_NC, pred_N, classes_NK.to(torch.uint8),
                   top_values.gather(1, order), position_N, margin_N.float(), top_values[:, -1].clone(),
                   labels_N.long(),
                   order_N, margin_N[order_N] + pred_N[order_N].double() * span, start_P, span,
                   RELATIVE_TOLERANCE * (1.0 + scale))

    def limits(self, d_C: torch.Tensor, tol: float) -> torch.Tensor:
        """Per predicted class p, the largest margin a shift d_C on every token may overcome: max_{c != p} d_c - d_p
        + tol ([151], -inf for p = 0, never predicted)."""
        limit_P = self._loss(d_C.double()) + tol
        limit_P[0] = -math.inf
        return limit_P

    def candidates(self, limit_P: torch.Tensor) -> torch.Tensor:
        """The tokens a shift might move, margin <= limit_P[prediction], ascending: a binary search per class."""
        classes_P = torch.arange(N_OUTPUTS, dtype=torch.float64)
        end_P = torch.searchsorted(self.key_N, limit_P + classes_P * self.span, right=True)
        start_P, stop_P = self.start_P[:-1], self.start_P[1:]
        count_P = (torch.minimum(end_P, stop_P) - start_P).clamp(min=0)
        if int(count_P.sum()) > SPARSE_SHARE * len(self.pred_N):
            # Many: one pass over the tokens' margins is cheaper than gathering them from the sorted order.
            return (self.margin_N.double() <= limit_P[self.pred_N]).nonzero().squeeze(1)
        first_P = torch.cumsum(count_P, 0) - count_P
        slot_X = torch.arange(int(count_P.sum())) + torch.repeat_interleave(start_P - first_P, count_P)
        return self.order_N[slot_X].sort().values

    def moved(self, shift: LogitShift) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, new predictions) of the tokens whose argmax over 1..150 of logits + delta differs from the
        baseline's; every other token keeps its prediction. Candidates are settled in blocks of consecutive tokens
        (ascending token order keeps every gather within a small stretch of memory)."""
        d_C = shift.shift_C
        tokens, preds = [], []
        if bool(d_C.any()):
            tol = self.tolerance + RELATIVE_TOLERANCE * float(d_C.abs().max())
            cand_X = self.candidates(self.limits(d_C, tol))
            if len(shift.rows_M):
                row_N = torch.zeros(len(self.pred_N), dtype=torch.bool)
                row_N.index_fill_(0, shift.rows_M, True)
                cand_X = cand_X[~row_N.index_select(0, cand_X)]
            for a in range(0, len(cand_X), SETTLE_BLOCK):
                block_X = cand_X[a:a + SETTLE_BLOCK]
                pred_X, settled_X = self._settle(block_X, d_C, tol)
                redo = (~settled_X).nonzero().squeeze(1)
                if len(redo):
                    pred_X[redo] = patch_predictions(self.logits_NC.index_select(0, block_X[redo]) + d_C)
                keep = pred_X != self.pred_N.index_select(0, block_X)
                tokens.append(block_X[keep])
                preds.append(pred_X[keep])
        if len(shift.rows_M):
            if "pred_M" not in shift.rows_memo:
                shift.rows_memo["pred_M"] = self._row_predictions(shift)
            keep = shift.rows_memo["pred_M"] != self.pred_N.index_select(0, shift.rows_M)
            tokens.append(shift.rows_M[keep])
            preds.append(shift.rows_memo["pred_M"][keep])
        if not tokens:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        return torch.cat(tokens), torch.cat(preds)

    def _row_predictions(self, shift: LogitShift) -> torch.Tensor:
        """The rows' predictions: those whose margin exceeds what their delta can take from their prediction keep
        it; the others are settled among their best classes, or recomputed."""
        rows_M, row_C, own = shift.rows_M, shift.row_C, shift.own
        pred_M, margin_M, own_MK, own_max_M, own_abs, own_pred_M = self._row_terms(shift)
        tol = self.tolerance + RELATIVE_TOLERANCE * (float(row_C.abs().max()) + own_abs)
        open_R = (margin_M <= self._loss(row_C).index_select(0, pred_M) + (own_max_M - own_pred_M) + tol
                  ).nonzero().squeeze(1)
        pred_M = pred_M.clone()
        for a in range(0, len(open_R), SETTLE_BLOCK):
            open_X = open_R[a:a + SETTLE_BLOCK]
            rows_X = rows_M.index_select(0, open_X)
            pred_X, settled_X = self._settle(rows_X, row_C, tol, own_MK.index_select(0, open_X), own,
                                             own_max_M.index_select(0, open_X), open_X)
            redo = (~settled_X).nonzero().squeeze(1)
            if len(redo):
                pred_X[redo] = patch_predictions(self.logits_NC.index_select(0, rows_X[redo]) + row_C +
                                                 own.full(open_X[redo]))
            pred_M[open_X] = pred_X
        return pred_M

    def _row_terms(self, shift: LogitShift) -> tuple:
        """The rows' baseline predictions and margins, and their own term at their best classes, at the prediction
        and at its largest: made once per own term (a latent set's serves every scale of its edit)."""
        own = shift.own
        if own.rows_terms is None:
            rows_M = shift.rows_M
            own_MK, own_max_M, own_abs = own.top(self.top_classes_NK.index_select(0, rows_M))
            own_pred_M = own_MK.gather(1, self.pred_position_N.index_select(0, rows_M).long()[:, None])[:, 0]
            own.rows_terms = (self.pred_N.index_select(0, rows_M), self.margin_N.index_select(0, rows_M), own_MK,
                              own_max_M, own_abs, own_pred_M)
        return own.rows_terms

    @staticmethod
    def _loss(d_C: torch.Tensor) -> torch.Tensor:
        """Per class p, max_{c != p} d_c - d_p over classes 1..150 ([151], p = 0 never predicted)."""
        d_P = d_C[1:]
        best = d_P.topk(2)
        others_P = torch.where(torch.arange(len(d_P)) == best.indices[0], best.values[1], best.values[0])
        return torch.cat([torch.zeros(1, dtype=d_C.dtype), others_P - d_P])

    def _settle(self, tokens_X: torch.Tensor, d_C: torch.Tensor, tol: float, own_XK: torch.Tensor | None = None,
                own: RowTerm | None = None, own_max_X: torch.Tensor | None = None,
                own_rows_X: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token, the argmax of logits + d (+ its own term) over its `TOP` best baseline classes and the `TOP`
        classes d raises most, and whether it is proven the argmax over all classes: it beats what any other class
        can reach, the token's floor + the next largest d (+ the own term's largest value)."""
        # Gathers by index_select: several times faster than advanced indexing on scattered tokens.
        top_XK = self.top_classes_NK.index_select(0, tokens_X).long()
        raised = d_C[1:].topk(min(self.TOP + 1, len(d_C) - 1))
        classes_J, next_d = raised.indices[:self.TOP] + 1, raised.values[-1]
        values_XK = self.top_logits_NK.index_select(0, tokens_X) + d_C.index_select(0, top_XK.reshape(-1)).reshape(
            top_XK.shape)
        at_XJ = (tokens_X[:, None] * self.logits_NC.shape[1] + classes_J).reshape(-1)
        values_XJ = self.logits_NC.reshape(-1).index_select(0, at_XJ).reshape(len(tokens_X), -1) + d_C[classes_J]
        bound_X = self.floor_N.index_select(0, tokens_X) + next_d
        if own is not None:
            values_XK = values_XK + own_XK
            values_XJ = values_XJ + own.at(classes_J).index_select(0, own_rows_X)
            bound_X = bound_X + own_max_X
        values = torch.cat([values_XK, values_XJ], 1)
        classes = torch.cat([top_XK, classes_J.expand(len(tokens_X), -1)], 1)
        best_X, position_X = values.max(1)
        pred_X = classes.gather(1, position_X[:, None])[:, 0]
        # The first maximum, as argmax gives it, is the lowest class among those that reach the best value.
        tied = ((values == best_X[:, None]).sum(1) > 1).nonzero().squeeze(1)
        if len(tied):
            pred_X[tied] = torch.where(values[tied] == best_X[tied, None], classes[tied], N_OUTPUTS).min(1).values
        return pred_X, best_X - bound_X > tol

    def predictions_after(self, shift: LogitShift) -> torch.Tensor:
        """argmax over 1..150 of logits + delta, per token."""
        tokens_X, pred_X = self.moved(shift)
        pred_N = self.pred_N.clone()
        pred_N[tokens_X] = pred_X
        return pred_N


@dataclass(frozen=True)
class RayExit:
    """Where each token's prediction leaves along one logit direction q_C, for shifts t_n q_C with t_n >= 0 per token
    (the random-direction control: the same direction at every setting, only its length per token changes). The
    baseline prediction p stays the argmax while t < t*_n = min over classes c with q_c > q_p of
    (l_p - l_c) / (q_c - q_p), and is lost beyond it (the argmax of lines in t leaves a line once, for good). Built
    once per direction, it decides every setting by a comparison; tokens whose decision the rounding of the summed
    logits could change are recomputed from the shift's own deltas."""

    exit_N: torch.Tensor  # t*_n (inf where no class gains on p along q)
    slope_N: torch.Tensor  # q_c - q_p of the class that catches p at t*_n: how fast the margin closes beyond it
    q_max: float  # max |q_c|

    BLOCK = 1 << 12  # tokens per block of the one pass

    @classmethod
    def build(cls, patch: PatchBaseline, q_C: torch.Tensor) -> RayExit:
        exits, slopes = [], []
        q_P = q_C[1:].float()
        for a in range(0, len(patch.pred_N), cls.BLOCK):
            logits_TP, pred_T = patch.logits_NC[a:a + cls.BLOCK, 1:], patch.pred_N[a:a + cls.BLOCK] - 1
            gap_TP = logits_TP.gather(1, pred_T[:, None]) - logits_TP  # l_p - l_c >= 0
            rise_TP = q_P[None, :] - q_P[pred_T][:, None]  # q_c - q_p
            exit_T, at_T = torch.where(rise_TP > 0, gap_TP / rise_TP, math.inf).min(1)
            exits.append(exit_T)
            slopes.append(rise_TP.gather(1, at_T[:, None])[:, 0])
        empty = torch.zeros(0)
        return cls(torch.cat(exits) if exits else empty, torch.cat(slopes) if slopes else empty,
                   float(q_C.abs().max()))

    def changed(self, patch: PatchBaseline, t_N: torch.Tensor, shift: LogitShift) -> torch.Tensor:
        """Whether each token's prediction changes under `shift`, which is t_N q_C: kept where its margin at t_N
        provably exceeds the tolerance, lost where the competitor's lead provably does, recomputed elsewhere. The
        margin is concave in t: at least margin_0 (1 - t / t*) before t*, at most -(t - t*) x slope beyond it."""
        t_N, exit_N = t_N.double(), self.exit_N.double()
        tol = patch.tolerance + RELATIVE_TOLERANCE * (float(t_N.max()) if len(t_N) else 0.0) * self.q_max
        kept_N = t_N < exit_N
        sure_N = torch.where(kept_N, patch.margin_N.double() * (1 - t_N / exit_N),
                             (t_N - exit_N) * self.slope_N.double()) > tol
        changed_N = ~kept_N
        redo = (~sure_N).nonzero().squeeze(1)
        if len(redo):
            changed_N[redo] = recomputed(patch.logits_NC, redo, lambda a, b: shift.dense(redo[a:b])) != \
                patch.pred_N[redo]
        return changed_N


def recomputed(logits_NC: torch.Tensor, tokens_X: torch.Tensor, delta) -> torch.Tensor:
    """The predictions of `tokens_X` on logits + delta(a, b) (the deltas of tokens_X[a:b]), a block at a time."""
    out = torch.empty(len(tokens_X), dtype=torch.int64)
    for a in range(0, len(tokens_X), SETTLE_BLOCK):
        b = min(a + SETTLE_BLOCK, len(tokens_X))
        out[a:b] = patch_predictions(logits_NC.index_select(0, tokens_X[a:b]) + delta(a, b))
    return out


def tensor_bytes(*values) -> int:
    """The bytes of the tensors among `values` (other values count 0)."""
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def largest_magnitude(values: torch.Tensor) -> float:
    """max |v| without a copy of the values (0 for none)."""
    return max(float(values.max()), -float(values.min())) if values.numel() else 0.0


class _Csr:
    """Per window, a few (key, count) entries: label histograms, or (label, prediction) pair counts."""

    @staticmethod
    def count_pairs(window_E: torch.Tensor, key_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(window x 151^2 + key, how many) of each distinct pair, ascending."""
        return torch.unique(window_E * (N_OUTPUTS ** 2) + key_E, return_counts=True)

    def __init__(self, blocks: list[tuple[torch.Tensor, torch.Tensor]], n_windows: int):
        """From the `count_pairs` of consecutive blocks of windows."""
        unique = torch.cat([u for u, _ in blocks]) if blocks else torch.zeros(0, dtype=torch.int64)
        count = torch.cat([c for _, c in blocks]) if blocks else torch.zeros(0, dtype=torch.int64)
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
        # Each window's label histogram and (label, prediction) counts, made a block of images at a time: blocks
        # come in window order, so their entries concatenate in order.
        hist, pairs_of, counts = [], [], torch.zeros(N_OUTPUTS ** 2, dtype=torch.int64)
        step = max(1, CHUNK_VALUES // (crop * crop))
        for a in range(0, n_images, step):
            b = min(a + step, n_images)
            windows, labels, pairs = [], [], []
            for shape, labels_RX, preds_RX in zip(geo.shapes, geo.per_shape(pixel_labels_BHW[a:b]),
                                                  geo.per_shape(pixel_pred_BHW[a:b])):
                ids = (torch.arange(a, b)[:, None] * grid * grid + shape.positions_Q[None]).reshape(-1)
                keep = labels_RX != 0
                windows.append(ids[:, None].expand_as(labels_RX)[keep])
                labels.append(labels_RX[keep].long())
                pairs.append(labels[-1] * N_OUTPUTS + preds_RX[keep].long())
            windows, labels, pairs = torch.cat(windows), torch.cat(labels), torch.cat(pairs)
            counts += torch.bincount(pairs, minlength=N_OUTPUTS ** 2)
            hist.append(_Csr.count_pairs(windows, labels))
            pairs_of.append(_Csr.count_pairs(windows, pairs))
        counts = counts.reshape(N_OUTPUTS, N_OUTPUTS)
        tolerance = RELATIVE_TOLERANCE * (1.0 + largest_magnitude(logits_NC))
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
            keys_c, margins_c = [], []
            for _, group, pred, margin in contested_predictions(
                    geo, chunk[contested], hi_RC[contested], lo_RC[contested], _gatherer(sub), tolerance, True):
                keys_c.append((chunk[contested][group][:, None] * N_OUTPUTS + pred + 1).reshape(-1))
                margins_c.append(margin.reshape(-1))
            if keys_c:
                # Each (window, class) once with its smallest margin, a chunk at a time (there is one entry per
                # pixel before): chunks hold disjoint, ascending windows, so their entries concatenate in order.
                unique_c, inverse = torch.unique(torch.cat(keys_c), return_inverse=True)
                keys.append(unique_c)
                margins.append(torch.full((len(unique_c),), float("inf")).scatter_reduce(
                    0, inverse, torch.cat(margins_c), reduce="amin"))
        unique = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
        least = torch.cat(margins) if margins else torch.zeros(0)
        return cls(geo, torch.cat(win_class), torch.cat(win_margin), unique // N_OUTPUTS, unique % N_OUTPUTS, least,
                   labels_S, _Csr(hist, geo.n_windows), _Csr(pairs_of, geo.n_windows), counts, tolerance)

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
        gt, pred, tp = [], [], []
        for a in range(0, len(pixel_labels_BHW), 64):  # a block of images at a time: no full-size temporaries
            labels_BX = pixel_labels_BHW[a:a + 64].flatten(1)
            pred_c_BX = (pixel_pred_BHW[a:a + 64].flatten(1) == class_index) & (labels_BX != 0)
            gt.append((labels_BX == class_index).sum(1))
            pred.append(pred_c_BX.sum(1))
            tp.append((pred_c_BX & (labels_BX == class_index)).sum(1))
        self.gt_B, self.pred_B, self.tp_B = (torch.cat(p) if p else torch.zeros(0, dtype=torch.int64)
                                             for p in (gt, pred, tp))

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
