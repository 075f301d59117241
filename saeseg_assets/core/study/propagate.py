"""The propagated mechanism: the SAE edit applied at its layer (error term kept), the backbone's tail run on the
edited tokens of every image an edit reaches (CLS and registers carried unedited), and the final-layer probe on what
comes out; the logit deltas enter the same exact-prediction machinery as the shortcut's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.tail import BLOCK_IMAGES, BackboneTail
from ..probe.metrics import N_OUTPUTS
from .edit import LatentEdit
from .logit_shift import LogitShift


@dataclass(frozen=True)
class Edit:
    """A per-token edit at the SAE's layer: `rest_D` on every token (None: nothing) except the tokens `tokens_U`
    (ascending), whose edit is coef_UK @ basis_KD."""

    rest_D: torch.Tensor | None
    tokens_U: torch.Tensor
    coef_UK: torch.Tensor
    basis_KD: torch.Tensor


class Propagation:
    """The tail's inputs for one set of images: the recorded patch tokens at the SAE's layer (as stored, upcast per
    block), the prefix tokens, the tail and the final-layer probe. Edited images go through the tail in blocks of
    `block_images`, the (image, edit) pairs of several edits packed together."""

    def __init__(self, tail: BackboneTail, prefix_BRD: torch.Tensor, patch_BPD: torch.Tensor,
                 probe_W_CD: torch.Tensor, probe_b_C: torch.Tensor, block_images: int = BLOCK_IMAGES):
        self.tail, self.prefix_BRD, self.patch_BPD = tail, prefix_BRD, patch_BPD
        self.probe_W_CD, self.probe_b_C = probe_W_CD.float(), probe_b_C.float()
        self.block_images = block_images
        self.n_images, self.n_patches = patch_BPD.shape[:2]

    def baseline_logits(self) -> torch.Tensor:
        """The final probe's logits after the tail on the unedited tokens: [n_images * P, 151]."""
        return self.logits([(i, None) for i in range(self.n_images)]).reshape(-1, N_OUTPUTS)

    def logits(self, pairs: list[tuple[int, torch.Tensor | None]]) -> torch.Tensor:
        """The final probe's logits of each (image, edit [P, D] or None) after the tail: [len(pairs), P, 151]."""
        out = []
        for a in range(0, len(pairs), self.block_images):
            block = pairs[a:a + self.block_images]
            images = torch.tensor([i for i, _ in block], dtype=torch.long)
            patch_bPD = self.patch_BPD[images].float()
            for j, (_, edit_PD) in enumerate(block):
                if edit_PD is not None:
                    patch_bPD[j] += edit_PD
            final_bPD = self.tail(self.prefix_BRD[images].float(), patch_bPD)
            out.append((final_bPD @ self.probe_W_CD.T.to(final_bPD.device) + self.probe_b_C.to(final_bPD.device)).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.n_patches, N_OUTPUTS)

    def images(self, edit: Edit) -> torch.Tensor:
        """The images an edit reaches: all where it has a rest term, else those holding an edited token."""
        if edit.rest_D is not None and bool(edit.rest_D.any()):
            return torch.arange(self.n_images)
        return torch.unique(edit.tokens_U // self.n_patches)

    def _image_edit(self, edit: Edit, image: int) -> torch.Tensor:
        """The edit on one image's patch tokens: [P, D]."""
        P = self.n_patches
        d_model = self.patch_BPD.shape[2]
        out_PD = (edit.rest_D.expand(P, -1).clone() if edit.rest_D is not None else torch.zeros(P, d_model))
        a, b = torch.searchsorted(edit.tokens_U, torch.tensor([image * P, (image + 1) * P]))
        if b > a:
            out_PD[edit.tokens_U[a:b] - image * P] = edit.coef_UK[a:b] @ edit.basis_KD
        return out_PD

    def shifts(self, edits: list[Edit], baseline_NC: torch.Tensor,
               only: torch.Tensor | None = None) -> list[LogitShift]:
        """Each edit's logit deltas against `baseline_NC` on every token of the images it reaches (of those among
        `only`, where given), all edits' images through the tail together."""
        reached = [self.images(e) for e in edits]
        if only is not None:
            reached = [images[torch.isin(images, only)] for images in reached]
        pairs = [(int(i), self._image_edit(e, int(i))) for e, images in zip(edits, reached) for i in images]
        logits_XPC = self.logits(pairs)
        out, a = [], 0
        P = self.n_patches
        for images in reached:
            rows_M = (images[:, None] * P + torch.arange(P)).reshape(-1)
            after_MC = logits_XPC[a:a + len(images)].reshape(-1, N_OUTPUTS)
            out.append(LogitShift.explicit(torch.zeros(N_OUTPUTS), rows_M, after_MC - baseline_NC[rows_M]))
            a += len(images)
        return out


class PropagatedEffect(LatentEdit):
    """A latent set's edit carried through the tail: x' = x + sum_i (v_i - f_i) W_dec[i] at the SAE's layer (the
    error term kept), the tail, the final probe."""

    def __init__(self, model, latents: tuple[int, ...]):
        super().__init__(model, latents)
        self.model = model
        self.W_LD = model.W_dec_SD[list(self.latents)]
        # The last setting's shift only: its deltas cover every token of the images it reaches (all of them in
        # every_token mode), and what the study keeps of a setting is what it changed (`ClassPatches.edit`); the
        # measure of a setting asks for its shift twice in a row (patch, then pixel level).
        self._last: tuple[tuple, LogitShift] | None = None

    @property
    def size_bytes(self) -> int:
        return super().size_bytes + (len(self._last[1].rows_M) * N_OUTPUTS * 4 if self._last else 0)

    def edit(self, scale: float, mode: str) -> Edit:
        """The edit at the SAE's layer."""
        v_L = self.values(scale)
        rest = v_L @ self.W_LD if mode == "every_token" else None
        return Edit(rest, self.tokens_U, v_L[None, :] - self.codes_UL, self.W_LD)

    def direction_edit(self, direction_D: torch.Tensor, scale: float, mode: str) -> Edit:
        """The random-direction control at the SAE's layer: the unit direction times the edit's own norm there."""
        rest, norms_U = self.norms(scale, mode)
        return Edit(rest * direction_D if rest else None, self.tokens_U, norms_U[:, None], direction_D[None, :])

    @staticmethod
    def _key(scale: float, mode: str) -> tuple[float, str]:
        # At scale 0 the two modes are one edit: v = 0 leaves the tokens where no chosen latent fires as they are.
        return float(scale), "where_active" if scale == 0 else mode

    def shift(self, scale: float, mode: str, images: list[int] | None = None) -> LogitShift:
        """The edit's logit shift; with `images`, on those images only (the examples' few)."""
        if images is not None:
            return self.model.propagated([self.edit(scale, mode)], torch.tensor(images, dtype=torch.long))[0]
        key = self._key(scale, mode)
        if self._last is None or self._last[0] != key:
            self._last = key, (self.model.propagated([self.edit(scale, mode)])[0] if self.latents else
                               LogitShift.zero())
        return self._last[1]

    def direction_shift(self, model, direction_D: torch.Tensor, scale: float, mode: str) -> LogitShift:
        return model.propagated([self.direction_edit(direction_D, scale, mode)])[0]

    def control_shifts(self, model, random_effects: list[PropagatedEffect], directions: list[torch.Tensor],
                       scale: float, mode: str) -> tuple[list[LogitShift], list[LogitShift]]:
        """The controls' shifts, every draw's images through the tail together."""
        todo = [e for e in random_effects if e.latents]
        shifts = model.propagated([e.edit(scale, mode) for e in todo] +
                                  [self.direction_edit(d, scale, mode) for d in directions])
        by_effect = dict(zip(map(id, todo), shifts))
        return [by_effect.get(id(e), LogitShift.zero()) for e in random_effects], shifts[len(todo):]
