"""The validation work all classes share, done once: the SAE's codes of every token stored per latent (CSC, so a
class reads only its latents' columns), the probe's baseline logits and pixel predictions (file format in `FIELDS`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.cache import ActivationCache
from ..probe.metrics import grid_logits, pixel_predictions
from ..store.checkpoints import CheckpointError, load_tensors, save_tensors
from .latent_stats import nonzero_codes

STEM = "val_codes"
FORMAT_VERSION = 1
FIELDS = {
    "indptr_S1": "latent i's entries are tokens_M[indptr_S1[i]:indptr_S1[i + 1]] (CSC column pointers)",
    "tokens_M": "token ids (image index * n_patches + patch index) where the latent fires, ascending per latent",
    "values_M": "the latent's code on those tokens (after top-k for topk SAEs)",
    "logits_NC": "the probe's logits of every validation token, before any edit",
    "pixel_pred_BHW": "baseline pixel predictions: bilinearly upsampled logits, argmax over 1..150",
}


@dataclass(frozen=True)
class Codes:
    """Sparse codes by latent, baseline logits [N, 151] and baseline pixel predictions [B, H, W]."""

    indptr_S1: torch.Tensor
    tokens_M: torch.Tensor
    values_M: torch.Tensor
    logits_NC: torch.Tensor
    pixel_pred_BHW: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return len(self.indptr_S1) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.logits_NC)

    def column(self, latent: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, values) where one latent fires."""
        a, b = int(self.indptr_S1[latent]), int(self.indptr_S1[latent + 1])
        return self.tokens_M[a:b], self.values_M[a:b]

    def columns(self, latents: list[int] | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens_U, codes_UL): the tokens where any of `latents` fires, ascending, and those latents' codes there."""
        if not latents:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, 0)
        parts = [self.column(i) for i in latents]
        tokens_U, inverse = torch.unique(torch.cat([t for t, _ in parts]).long(), return_inverse=True)
        codes_UL = torch.zeros(len(tokens_U), len(latents))
        offset = 0
        for j, (tokens, values) in enumerate(parts):
            codes_UL[inverse[offset:offset + len(tokens)], j] = values
            offset += len(tokens)
        return tokens_U, codes_UL


@torch.inference_mode()
def compute_codes(sae, probe, cache: ActivationCache, device: str = "cpu", block_images: int = 16,
                      log: Callable[[str], None] = print, spans: list[tuple[int, int]] | None = None) -> Codes:
    """One SAE pass and one probe pass over the cache's images, or over those of `spans` numbered in their order
    (the held-out training images used for tuning); codes are regrouped by latent at the end."""
    if sae.spec.d_model != cache.d_model or probe.d_model != cache.d_model:
        raise ValueError(f"d_model: SAE {sae.spec.d_model}, probe {probe.d_model}, cache {cache.path} {cache.d_model}")
    dev = torch.device(device)
    sae, probe_dev = sae.to(dev), probe.to(dev)
    crop = int(cache.attrs["crop_size"])
    tok_parts, lat_parts, val_parts, logit_parts, pixel_parts = [], [], [], [], []
    first = 0  # the first image of the span among the images read
    for a, b in spans or [(0, cache.n_images)]:
        for start, block in cache.iter_blocks(("activations",), block_images, start=a, stop=b):
            acts_BPD = torch.from_numpy(block["activations"]).to(dev, torch.float32)
            tok_M, lat_M, val_M = nonzero_codes(*sae.encode(acts_BPD.reshape(-1, cache.d_model)))
            # Token and latent ids as int32 (what the file holds): half the memory of a split's codes.
            tok_parts.append((tok_M.cpu() + (first + start - a) * cache.n_patches).to(torch.int32))
            lat_parts.append(lat_M.cpu().to(torch.int32))
            val_parts.append(val_M.float().cpu())
            # The same arithmetic as the probe's evaluation, so baseline figures agree with `baseline_metrics`.
            logits_BPC = torch.einsum("bpd,cd->bpc", acts_BPD, probe_dev.weight_CD) + probe_dev.bias_C
            logit_parts.append(logits_BPC.reshape(-1, logits_BPC.shape[-1]).cpu())
            pixel_parts.append(pixel_predictions(grid_logits(logits_BPC, cache.grid), crop).to(torch.uint8).cpu())
        first += b - a
    tokens = torch.cat(tok_parts) if tok_parts else torch.zeros(0, dtype=torch.int32)
    latents = torch.cat(lat_parts) if lat_parts else torch.zeros(0, dtype=torch.int32)
    values = torch.cat(val_parts) if val_parts else torch.zeros(0)
    del tok_parts, lat_parts, val_parts
    # Sort by (latent, token): tokens arrive ascending, so a stable sort by latent suffices.
    order = torch.argsort(latents, stable=True)
    indptr = torch.zeros(sae.spec.d_sae + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(latents, minlength=sae.spec.d_sae), 0)
    del latents
    codes = Codes(indptr, tokens[order], values[order], torch.cat(logit_parts),
                     torch.cat(pixel_parts),
                     {"format": "saeseg-val-codes", "format_version": FORMAT_VERSION, "fields": FIELDS,
                      "cache": {"fingerprint": cache.fingerprint, "spans": [list(s) for s in spans or []]}})
    n_tokens = len(codes.logits_NC)
    log(f"codes: {len(values)} non-zero codes over {n_tokens} tokens ({len(values) / max(n_tokens, 1):.1f} per token)")
    return codes


def save_codes(folder: Path, codes: Codes, meta: dict | None = None) -> Path:
    tensors = {"indptr_S1": codes.indptr_S1, "tokens_M": codes.tokens_M, "values_M": codes.values_M,
               "logits_NC": codes.logits_NC, "pixel_pred_BHW": codes.pixel_pred_BHW}
    return save_tensors(Path(folder), STEM, tensors, {**codes.meta, **(meta or {})})[0]


def load_codes(folder: Path) -> Codes:
    tensors, meta = load_tensors(Path(folder), STEM)
    if missing := set(FIELDS) - set(tensors):
        raise CheckpointError(f"{folder}: validation codes lack {sorted(missing)}; materialize val_codes again")
    # Token ids stay int32 as stored (half the memory); a latent's column is widened when read.
    return Codes(tensors["indptr_S1"].long(), tensors["tokens_M"].int(), tensors["values_M"].float(),
                    tensors["logits_NC"].float(), tensors["pixel_pred_BHW"], meta)
