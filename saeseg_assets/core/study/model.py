"""What every class's study shares, loaded once per run: decoder rows, probe, latent maxima and frequencies, the codes
of one set of images with their labels, and the baseline predictions with the margins that make edits cheap."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..probe.metrics import N_OUTPUTS, ConfusionMatrix
from .codes import Codes
from .logit_shift import PatchBaseline, PixelBaseline
from .workers import release_memory, single_thread

if TYPE_CHECKING:
    from .propagate import Propagation


class SuppressionModel:
    """The shared inputs of one set of images (validation, or the held-out training images used for tuning).
    `pixel=False` leaves out the pixel level and holds no pixel data (tuning is measured on patches: its labels'
    shape gives the number of images). With a `propagation` (the backbone's
    tail and the final-layer probe) edits go through the tail (mechanism "propagate"), and `codes` must carry the
    final probe's baseline logits after the tail; without one they are taken into the probe's logits directly
    (mechanism "shortcut")."""

    def __init__(self, W_dec_SD: torch.Tensor, probe_W_CD: torch.Tensor, max_activation_S: np.ndarray,
                 frequency_S: np.ndarray, codes: Codes, patch_labels_N: torch.Tensor,
                 pixel_labels_BHW: torch.Tensor, grid: int, pixel: bool = True, propagation: Propagation | None = None):
        self.propagation = propagation
        self.W_dec_SD = W_dec_SD.float()
        self.probe_W_CD = probe_W_CD.float()
        self.max_activation_S = torch.as_tensor(np.asarray(max_activation_S), dtype=torch.float32)
        self.frequency_S = np.asarray(frequency_S, dtype=np.float64)
        self.codes = codes if pixel else replace(codes, pixel_pred_BHW=codes.pixel_pred_BHW[:0].clone())
        self.grid = grid
        self._n_images = len(pixel_labels_BHW)
        self.pixel_labels_BHW = pixel_labels_BHW if pixel else None
        with single_thread():
            self.patch = PatchBaseline.build(codes.logits_NC, patch_labels_N)
            self.pixel = (PixelBaseline.build(codes.logits_NC, pixel_labels_BHW, codes.pixel_pred_BHW, grid)
                          if pixel else None)
        self.pixel_before = ConfusionMatrix.from_counts(self.pixel.counts_KK) if pixel else None
        self.pixels_BC = None if not pixel else torch.cat([_class_pixels(pixel_labels_BHW[a:a + 64]) for a in range(
            0, len(pixel_labels_BHW), 64)]) if len(pixel_labels_BHW) else torch.zeros(0, N_OUTPUTS, dtype=torch.int64)
        release_memory()  # the blocks the baselines were built from

    @property
    def n_tokens(self) -> int:
        return self.codes.n_tokens

    @property
    def n_images(self) -> int:
        return self._n_images

    @property
    def mechanism(self) -> str:
        return "shortcut" if self.propagation is None else "propagate"

    def effect(self, latents: tuple[int, ...]):
        """What suppressing a latent set does, under this model's mechanism (`LatentEffect` or `PropagatedEffect`)."""
        from .edit import LatentEffect
        from .propagate import PropagatedEffect

        return (LatentEffect if self.propagation is None else PropagatedEffect)(self, tuple(latents))

    def propagated(self, edits: list, only: torch.Tensor | None = None) -> list:
        """The logit shifts of edits at the SAE's layer carried through the tail (`Propagation.shifts`)."""
        return self.propagation.shifts(edits, self.codes.logits_NC, only)

    def decoder_logits(self, latents: tuple[int, ...]) -> torch.Tensor:
        """P_LC = W_dec[L] W_probe^T: what one unit of each latent adds to the logits."""
        return self.W_dec_SD[list(latents)] @ self.probe_W_CD.T


def _class_pixels(pixel_labels_BHW: torch.Tensor) -> torch.Tensor:
    """Pixels of each label per image: [B, 151]."""
    labels_BX = pixel_labels_BHW.reshape(len(pixel_labels_BHW), -1).long()
    offsets = torch.arange(len(labels_BX))[:, None] * N_OUTPUTS
    return torch.bincount((labels_BX + offsets).reshape(-1), minlength=len(labels_BX) * N_OUTPUTS).reshape(
        -1, N_OUTPUTS)


def load_model(sae_folder, probe_folder, stats_folder, codes_folder, cache, pixel: bool = True,
               tail=None) -> SuppressionModel:
    """Reads the shared inputs once: decoder rows, probe, latent maxima and frequencies, the codes of one set of
    images (all of `cache`, or the spans the codes were computed on) and their labels. With a `tail` (a
    `BackboneTail` after the cache's layer), `probe_folder` holds the final-layer probe and the model propagates:
    its baseline is that probe after the tail on the recorded, unedited tokens."""
    from ..probe.metrics import grid_logits, pixel_predictions
    from ..probe.model import load_probe
    from ..sae.model import load_sae
    from .codes import load_codes
    from .latent_stats import load_latent_stats

    sae, _ = load_sae(sae_folder)
    probe = load_probe(probe_folder)
    stats = load_latent_stats(stats_folder)
    codes = load_codes(codes_folder)
    spans = [tuple(span) for span in codes.meta.get("cache", {}).get("spans") or [(0, cache.n_images)]]
    n_images = sum(b - a for a, b in spans)
    # Which SAE each input was made from is the caller's to check (the store's manifests); this catches a mix-up.
    if codes.n_tokens != n_images * cache.n_patches or stats.d_sae != sae.spec.d_sae or codes.d_sae != sae.spec.d_sae:
        raise ValueError(f"{codes_folder} / {stats_folder} do not match the SAE in {sae_folder} and the cache "
                         f"{cache.path}: materialize latent_stats and the codes again")

    def read(field: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([cache.read(field, a, b) for a, b in spans]))

    labels_N = read("patch_labels").reshape(-1)
    # Without the pixel level only the number of images is read from the labels.
    pixels_BHW = read("pixel_labels") if pixel else torch.zeros(n_images, 0, 0, dtype=torch.uint8)
    propagation = None
    if tail is not None:
        if probe.layer != "final":
            raise ValueError(f"{probe_folder}: the propagated study reads a probe on the final layer, this one reads "
                             f"{probe.layer!r}")
        if not cache.settings.has_tail_tokens:
            raise ValueError(f"{cache.path} holds no prefix tokens: record it again (cache format "
                             f"{cache.attrs.get('format_version')}) to propagate edits through the tail")
        from .propagate import Propagation

        propagation = Propagation(tail, read("prefix_tokens"), read("activations"), probe.weight_CD, probe.bias_C)
        logits_NC = propagation.baseline_logits()
        P, crop = cache.n_patches, pixels_BHW.shape[-1]
        pixel_pred_BHW = torch.cat([pixel_predictions(grid_logits(logits_NC[a * P:(a + 16) * P].reshape(
            -1, P, N_OUTPUTS), cache.grid), crop).to(torch.uint8) for a in range(0, n_images, 16)]) \
            if n_images and pixel else codes.pixel_pred_BHW
        codes = replace(codes, logits_NC=logits_NC, pixel_pred_BHW=pixel_pred_BHW)
    return SuppressionModel(sae.W_dec_SD.detach(), probe.weight_CD, stats.act_max_S, stats.frequency_S, codes,
                            labels_N, pixels_BHW, cache.grid, pixel, propagation)
