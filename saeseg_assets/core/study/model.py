"""What every class's study shares, loaded once per run: decoder rows, probe, latent maxima and frequencies, the codes
of one set of images with their labels, and the baseline predictions with the margins that make edits cheap."""

from __future__ import annotations

import numpy as np
import torch

from ..probe.metrics import N_OUTPUTS, ConfusionMatrix
from .codes import Codes
from .logit_shift import PatchBaseline, PixelBaseline
from .workers import single_thread


class SuppressionModel:
    """The shared inputs of one set of images (validation, or the held-out training images used for tuning).
    `pixel=False` leaves out the pixel level (tuning is measured on patches)."""

    def __init__(self, W_dec_SD: torch.Tensor, probe_W_CD: torch.Tensor, max_activation_S: np.ndarray,
                 frequency_S: np.ndarray, codes: Codes, patch_labels_N: torch.Tensor,
                 pixel_labels_BHW: torch.Tensor, grid: int, pixel: bool = True):
        self.W_dec_SD = W_dec_SD.float()
        self.probe_W_CD = probe_W_CD.float()
        self.max_activation_S = torch.as_tensor(np.asarray(max_activation_S), dtype=torch.float32)
        self.frequency_S = np.asarray(frequency_S, dtype=np.float64)
        self.codes = codes
        self.grid = grid
        self.pixel_labels_BHW = pixel_labels_BHW
        with single_thread():
            self.patch = PatchBaseline.build(codes.logits_NC, patch_labels_N)
            self.pixel = (PixelBaseline.build(codes.logits_NC, pixel_labels_BHW, codes.pixel_pred_BHW, grid)
                          if pixel else None)
        self.pixel_before = ConfusionMatrix.from_counts(self.pixel.counts_KK) if pixel else None
        self.pixels_BC = torch.cat([_class_pixels(pixel_labels_BHW[a:a + 64])
                                    for a in range(0, len(pixel_labels_BHW), 64)]) if len(pixel_labels_BHW) else \
            torch.zeros(0, N_OUTPUTS, dtype=torch.int64)

    @property
    def n_tokens(self) -> int:
        return self.codes.n_tokens

    @property
    def n_images(self) -> int:
        return len(self.pixel_labels_BHW)

    def decoder_logits(self, latents: tuple[int, ...]) -> torch.Tensor:
        """P_LC = W_dec[L] W_probe^T: what one unit of each latent adds to the logits."""
        return self.W_dec_SD[list(latents)] @ self.probe_W_CD.T


def _class_pixels(pixel_labels_BHW: torch.Tensor) -> torch.Tensor:
    """Pixels of each label per image: [B, 151]."""
    labels_BX = pixel_labels_BHW.reshape(len(pixel_labels_BHW), -1).long()
    offsets = torch.arange(len(labels_BX))[:, None] * N_OUTPUTS
    return torch.bincount((labels_BX + offsets).reshape(-1), minlength=len(labels_BX) * N_OUTPUTS).reshape(
        -1, N_OUTPUTS)


def load_model(sae_folder, probe_folder, stats_folder, codes_folder, cache, pixel: bool = True) -> SuppressionModel:
    """Reads the shared inputs once: decoder rows, probe, latent maxima and frequencies, the codes of one set of
    images (all of `cache`, or the spans the codes were computed on) and their labels."""
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
    labels_N = torch.from_numpy(np.concatenate([cache.read("patch_labels", a, b) for a, b in spans])).reshape(-1)
    pixels_BHW = torch.from_numpy(np.concatenate([cache.read("pixel_labels", a, b) for a, b in spans]))
    return SuppressionModel(sae.W_dec_SD.detach(), probe.weight_CD, stats.act_max_S, stats.frequency_S, codes,
                            labels_N, pixels_BHW, cache.grid, pixel)
