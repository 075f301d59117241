"""The validation work all classes share, done once: the SAE's codes of every token stored per latent (CSC, so a
class reads only its latents' columns), the probe's baseline logits and pixel predictions (file format in `FIELDS`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.cache import ActivationCache
from ..probe.metrics import grid_logits, pixel_predictions
from ..store.checkpoints import CheckpointError, load_tensors, stream_tensors
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


CHUNK_ENTRIES = 1 << 23  # non-zero codes held at once (about 100 MB, twice that while sorted), then set aside on disk


@torch.inference_mode()
def write_codes(folder: Path, sae, probe, cache: ActivationCache, device: str = "cpu", block_images: int = 16,
                log: Callable[[str], None] = print, spans: list[tuple[int, int]] | None = None,
                chunk_entries: int = CHUNK_ENTRIES) -> dict:
    """One SAE pass and one probe pass over the cache's images, or over those of `spans` numbered in their order
    (the held-out training images used for tuning), written to `folder` as the pair val_codes.safetensors + .json;
    returns the JSON's contents. Memory stays flat in the images: the logits and pixel predictions go to disk a block
    at a time, the codes a chunk at a time sorted by latent, and the chunks are merged into columns at the end."""
    if sae.spec.d_model != cache.d_model or probe.d_model != cache.d_model:
        raise ValueError(f"d_model: SAE {sae.spec.d_model}, probe {probe.d_model}, cache {cache.path} {cache.d_model}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    sae, probe_dev = sae.to(dev), probe.to(dev)
    crop, d_sae = int(cache.attrs["crop_size"]), sae.spec.d_sae
    scratch = folder / f".{STEM}.{os.getpid()}.parts"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        parts = _Parts(scratch, d_sae, chunk_entries)
        first = 0  # the first image of the span among the images read
        for a, b in spans or [(0, cache.n_images)]:
            for start, block in cache.iter_blocks(("activations",), block_images, start=a, stop=b):
                acts_BPD = torch.from_numpy(block["activations"]).to(dev, torch.float32)
                tok_M, lat_M, val_M = nonzero_codes(*sae.encode(acts_BPD.reshape(-1, cache.d_model)))
                parts.add_codes((tok_M.cpu() + (first + start - a) * cache.n_patches).to(torch.int32),
                                lat_M.cpu().to(torch.int32), val_M.float().cpu())
                # The same arithmetic as the probe's evaluation, so baseline figures agree with `baseline_metrics`.
                logits_BPC = torch.einsum("bpd,cd->bpc", acts_BPD, probe_dev.weight_CD) + probe_dev.bias_C
                parts.add("logits_NC", logits_BPC.reshape(-1, logits_BPC.shape[-1]).float().cpu())
                parts.add("pixel_pred_BHW", pixel_predictions(grid_logits(logits_BPC, cache.grid), crop)
                          .to(torch.uint8).cpu())
            first += b - a
        parts.flush_codes()
        n_tokens, nonzero = first * cache.n_patches, parts.nonzero
        shapes = {"logits_NC": [n_tokens, probe.weight_CD.shape[0]], "pixel_pred_BHW": [first, crop, crop]}
        meta = {"format": "saeseg-val-codes", "format_version": FORMAT_VERSION, "fields": FIELDS,
                "cache": {"fingerprint": cache.fingerprint, "spans": [list(s) for s in spans or []]}}
        layout = {"indptr_S1": (torch.int64, [d_sae + 1]), "logits_NC": (torch.float32, shapes["logits_NC"]),
                  "tokens_M": (torch.int32, [nonzero]), "values_M": (torch.float32, [nonzero]),
                  "pixel_pred_BHW": (torch.uint8, shapes["pixel_pred_BHW"])}

        def write_data(out, offsets: dict[str, int]) -> None:
            out.write(parts.indptr().numpy().tobytes())
            parts.copy("logits_NC", out)
            parts.merge_columns(out, offsets["tokens_M"], offsets["values_M"])
            out.seek(offsets["pixel_pred_BHW"])
            parts.copy("pixel_pred_BHW", out)

        stream_tensors(folder, STEM, layout, write_data, meta)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"codes: {nonzero} non-zero codes over {n_tokens} tokens ({nonzero / max(n_tokens, 1):.1f} per token)")
    return meta


class _Parts:
    """The pieces of a codes file on disk while it is computed: the logits and pixel predictions appended a block at
    a time, and the codes in chunks, each sorted by (latent, token) with its count per latent."""

    def __init__(self, scratch: Path, d_sae: int, chunk_entries: int):
        self.scratch, self.d_sae, self.chunk_entries = scratch, d_sae, chunk_entries
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.counts: list[torch.Tensor] = []  # per chunk, entries per latent
        self.nonzero = 0

    def add(self, name: str, values: torch.Tensor) -> None:
        with open(self.scratch / name, "ab") as f:
            f.write(values.contiguous().numpy().tobytes())

    def copy(self, name: str, out) -> None:
        path = self.scratch / name
        if path.exists():
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)

    def add_codes(self, tokens: torch.Tensor, latents: torch.Tensor, values: torch.Tensor) -> None:
        self.pending.append((tokens, latents, values))
        if sum(len(t) for t, _, _ in self.pending) >= self.chunk_entries:
            self.flush_codes()

    def flush_codes(self) -> None:
        """Sorts the pending codes by (latent, token) and sets them aside: tokens arrive ascending, so a stable sort
        by latent suffices."""
        if not self.pending:
            return
        tokens, latents, values = (torch.cat(p) for p in zip(*self.pending))
        self.pending = []
        order = torch.argsort(latents, stable=True)
        chunk = len(self.counts)
        tokens.index_select(0, order).numpy().tofile(self.scratch / f"tokens.{chunk}")
        values.index_select(0, order).numpy().tofile(self.scratch / f"values.{chunk}")
        self.counts.append(torch.bincount(latents, minlength=self.d_sae))
        self.nonzero += len(tokens)

    def indptr(self) -> torch.Tensor:
        indptr = torch.zeros(self.d_sae + 1, dtype=torch.int64)
        if self.counts:
            indptr[1:] = torch.cumsum(torch.stack(self.counts).sum(0), 0)
        return indptr

    def merge_columns(self, out, tokens_at: int, values_at: int) -> None:
        """Writes tokens_M at `tokens_at` and values_M at `values_at`: every latent's entries from the chunks in order
        (so ascending tokens), a range of latents at a time."""
        per_latent = max(1, self.chunk_entries // max(self.nonzero // max(self.d_sae, 1), 1))
        starts = [torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(c, 0)]) for c in self.counts]
        for lo in range(0, self.d_sae, per_latent):
            hi = min(lo + per_latent, self.d_sae)
            spans = [(int(start[lo]), int(start[hi])) for start in starts]
            latent_ids = [torch.repeat_interleave(torch.arange(lo, hi), c[lo:hi]) for c in self.counts]
            if not latent_ids:
                return
            order = torch.argsort(torch.cat(latent_ids), stable=True)
            for name, dtype, at in (("tokens", np.int32, tokens_at), ("values", np.float32, values_at)):
                merged = torch.cat([torch.from_numpy(np.fromfile(self.scratch / f"{name}.{chunk}", dtype=dtype,
                                                                 count=b - a, offset=a * 4))
                                    for chunk, (a, b) in enumerate(spans)]).index_select(0, order)
                out.seek(at + 4 * sum(a for a, _ in spans))  # latent lo's first entry in the column
                out.write(merged.numpy().tobytes())


def load_codes(folder: Path) -> Codes:
    tensors, meta = load_tensors(Path(folder), STEM)
    if missing := set(FIELDS) - set(tensors):
        raise CheckpointError(f"{folder}: validation codes lack {sorted(missing)}; materialize val_codes again")
    # Token ids stay int32 as stored (half the memory); a latent's column is widened when read.
    return Codes(tensors["indptr_S1"].long(), tensors["tokens_M"].int(), tensors["values_M"].float(),
                    tensors["logits_NC"].float(), tensors["pixel_pred_BHW"], meta)
