"""Statistics of an SAE's latents over the training cache in one streaming pass (per latent, per class and latent,
top patches; file format in `STAT_FIELDS`, safetensors + JSON). The rules that rank latents per class: rules.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.cache import ActivationCache
from ..probe.metrics import N_OUTPUTS
from ..settings import DENSE_FREQUENCY, StatsSettings
from ..store.checkpoints import CheckpointError, load_tensors, save_tensors

STEM = "latent_stats"
FORMAT_VERSION = 2  # 2: the top patches come from distinct images

# Name -> meaning; every array of the file. C = 151 outputs (row 0: label "other"), S = latents, T = top patches.
STAT_FIELDS = {
    "fire_count_S": "tokens on which the latent fires (code > 0)",
    "act_sum_S": "sum of the latent's code over all tokens",
    "act_max_S": "largest code of the latent (0 if it never fires)",
    "class_patches_C": "tokens whose patch has majority label c",
    "class_fire_count_CS": "tokens of majority label c on which the latent fires",
    "class_act_sum_CS": "sum of the latent's code over tokens of majority label c",
    "pure_patches_C": "tokens of majority label c with purity >= the stats' purity threshold",
    "pure_fire_count_CS": "pure tokens of label c on which the latent fires",
    "pure_act_sum_CS": "sum of the latent's code over pure tokens of label c",
    "top_values_ST": "the latent's T largest codes, at most one per image, descending (0 where it fired on fewer "
                     "images)",
    "top_tokens_ST": "their tokens: image index * n_patches + patch index (-1 where none); ties: lower token first",
}


@dataclass(frozen=True)
class LatentStats:
    """The arrays of `STAT_FIELDS` as numpy arrays, plus the counts that give them meaning."""

    n_tokens: int
    n_patches: int
    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def __getattr__(self, name: str) -> np.ndarray:
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(name)

    @property
    def d_sae(self) -> int:
        return len(self.arrays["fire_count_S"])

    @property
    def frequency_S(self) -> np.ndarray:
        """Share of training tokens on which each latent fires."""
        return self.fire_count_S / max(self.n_tokens, 1)

    @property
    def mean_active_S(self) -> np.ndarray:
        """Mean code over the tokens where the latent fires (0 for latents that never fire)."""
        return np.divide(self.act_sum_S, self.fire_count_S, out=np.zeros(self.d_sae), where=self.fire_count_S > 0)


def dense_mask(frequency_S, threshold: float = DENSE_FREQUENCY):
    """Which latents are dense: those firing on at least `threshold` of the tokens (a numpy array or a tensor)."""
    return frequency_S >= threshold


def nonzero_codes(vals_NK: torch.Tensor, idx_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero entries of codes as `Sae.encode` gives them: (token [M], latent [M], value [M]), token-major."""
    live_NK = vals_NK > 0
    tok_NK = torch.arange(len(vals_NK), device=vals_NK.device)[:, None].expand_as(idx_NK)
    return tok_NK[live_NK], idx_NK[live_NK], vals_NK[live_NK]


def merge_top(values_ST: torch.Tensor, tokens_ST: torch.Tensor, lat_M: torch.Tensor, val_M: torch.Tensor,
              tok_M: torch.Tensor, n_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per latent, the T largest of (kept entries, new entries), at most one per image (token // n_patches), so a
    gallery shows T images rather than one image T times; ties go to the lower token id."""
    S, T = values_ST.shape
    # Only new entries that beat the current T-th value of their latent can enter.
    beats = (val_M > values_ST[lat_M, T - 1]) | ((val_M == values_ST[lat_M, T - 1]) & (tokens_ST[lat_M, T - 1] < 0))
    lat_M, val_M, tok_M = lat_M[beats], val_M[beats], tok_M[beats]
    if not len(lat_M):
        return values_ST, tokens_ST
    touched = torch.unique(lat_M)
    old = tokens_ST[touched] >= 0
    lat = torch.cat([touched[:, None].expand(-1, T)[old], lat_M])
    val = torch.cat([values_ST[touched][old], val_M])
    tok = torch.cat([tokens_ST[touched][old], tok_M])
    # Three stable sorts give the order (latent, -value, token).
    order = torch.argsort(tok, stable=True)
    order = order[torch.argsort(-val[order], stable=True)]
    order = order[torch.argsort(lat[order], stable=True)]
    lat, val, tok = lat[order], val[order], tok[order]
    # The first of each (latent, image) in this order is that image's best token for the latent.
    image = tok // n_patches
    pair = lat * (int(image.max()) + 1) + image
    _, inverse = torch.unique(pair, return_inverse=True)
    position = torch.arange(len(pair), device=pair.device)
    first = torch.full((int(inverse.max()) + 1,), len(pair), device=pair.device).scatter_reduce(
        0, inverse, position, reduce="amin")
    best = first[inverse] == position
    lat, val, tok = lat[best], val[best], tok[best]
    counts = torch.bincount(lat, minlength=S)
    rank = torch.arange(len(lat), device=lat.device) - (torch.cumsum(counts, 0) - counts)[lat]
    keep = rank < T
    values_ST, tokens_ST = values_ST.clone(), tokens_ST.clone()
    values_ST[touched], tokens_ST[touched] = 0.0, -1
    values_ST[lat[keep], rank[keep]] = val[keep]
    tokens_ST[lat[keep], rank[keep]] = tok[keep]
    return values_ST, tokens_ST


@torch.inference_mode()
def compute_latent_stats(sae, cache: ActivationCache, config: StatsSettings = StatsSettings(), device: str = "cpu",
                         log: Callable[[str], None] = print) -> LatentStats:
    """One streaming pass of the SAE over `cache`: every count and sum accumulated over the sparse codes with
    bincount / index_add (the cost scales with the non-zero codes, not tokens x latents)."""
    if sae.spec.d_model != cache.d_model:
        raise ValueError(f"the SAE encodes d_model {sae.spec.d_model}, the cache {cache.path} holds {cache.d_model}")
    dev = torch.device(device)
    sae = sae.to(dev)
    S, C, P, T = sae.spec.d_sae, N_OUTPUTS, cache.n_patches, config.top_patches
    acc = {
        "fire_count_S": torch.zeros(S, dtype=torch.int64, device=dev),
        "act_sum_S": torch.zeros(S, dtype=torch.float64, device=dev),
        "act_max_S": torch.zeros(S, dtype=torch.float32, device=dev),
        "class_patches_C": torch.zeros(C, dtype=torch.int64, device=dev),
        "class_fire_count_CS": torch.zeros(C * S, dtype=torch.int64, device=dev),
        "class_act_sum_CS": torch.zeros(C * S, dtype=torch.float64, device=dev),
        "pure_patches_C": torch.zeros(C, dtype=torch.int64, device=dev),
        "pure_fire_count_CS": torch.zeros(C * S, dtype=torch.int64, device=dev),
        "pure_act_sum_CS": torch.zeros(C * S, dtype=torch.float64, device=dev),
    }
    top_values_ST = torch.zeros(S, T, dtype=torch.float32, device=dev)
    top_tokens_ST = torch.full((S, T), -1, dtype=torch.int64, device=dev)
    fields = ("activations", "patch_labels", "patch_purity")
    for start, block in cache.iter_blocks(fields, config.block_images):
        x_ND = torch.from_numpy(block["activations"]).to(dev, torch.float32).reshape(-1, cache.d_model)
        label_N = torch.from_numpy(block["patch_labels"]).to(dev).reshape(-1).long()
        pure_N = torch.from_numpy(block["patch_purity"]).to(dev).reshape(-1) >= config.purity
        tok_M, lat_M, val_M = nonzero_codes(*sae.encode(x_ND))
        val64_M = val_M.double()
        acc["fire_count_S"] += torch.bincount(lat_M, minlength=S)
        acc["act_sum_S"].index_add_(0, lat_M, val64_M)
        acc["act_max_S"].scatter_reduce_(0, lat_M, val_M.float(), reduce="amax")
        pair_M = label_N[tok_M] * S + lat_M
        acc["class_patches_C"] += torch.bincount(label_N, minlength=C)
        acc["class_fire_count_CS"] += torch.bincount(pair_M, minlength=C * S)
        acc["class_act_sum_CS"].index_add_(0, pair_M, val64_M)
        pure_M = pure_N[tok_M]
        acc["pure_patches_C"] += torch.bincount(label_N[pure_N], minlength=C)
        acc["pure_fire_count_CS"] += torch.bincount(pair_M[pure_M], minlength=C * S)
        acc["pure_act_sum_CS"].index_add_(0, pair_M[pure_M], val64_M[pure_M])
        top_values_ST, top_tokens_ST = merge_top(top_values_ST, top_tokens_ST, lat_M, val_M.float(),
                                                 start * P + tok_M, P)
    arrays = {k: v.cpu().numpy().reshape(C, S) if k.endswith("_CS") else v.cpu().numpy() for k, v in acc.items()}
    arrays["top_values_ST"], arrays["top_tokens_ST"] = top_values_ST.cpu().numpy(), top_tokens_ST.cpu().numpy()
    meta = {"format": "saeseg-latent-stats", "format_version": FORMAT_VERSION, "purity": config.purity,
            "top_patches": T, "cache": {"path": str(cache.path), "fingerprint": cache.fingerprint},
            "fields": STAT_FIELDS}
    stats = LatentStats(cache.n_tokens, P, arrays, meta)
    log(f"latent stats over {cache.n_tokens} tokens: {int((stats.fire_count_S > 0).sum())} of {S} latents fire, "
        f"{int(dense_mask(stats.frequency_S).sum())} on >= {DENSE_FREQUENCY:.0%} of tokens")
    return stats


def save_latent_stats(folder: Path, stats: LatentStats, meta: dict | None = None) -> Path:
    """Writes latent_stats.safetensors + latent_stats.json atomically (the JSON last)."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stats.arrays.items()}
    full = {**stats.meta, **(meta or {}), "n_tokens": stats.n_tokens, "n_patches": stats.n_patches}
    return save_tensors(Path(folder), STEM, tensors, full)[0]


def load_latent_stats(folder: Path) -> LatentStats:
    tensors, meta = load_tensors(Path(folder), STEM)
    if missing := set(STAT_FIELDS) - set(tensors):
        raise CheckpointError(f"{folder}: latent statistics lack {sorted(missing)}; materialize latent_stats again")
    arrays = {k: tensors[k].numpy() for k in STAT_FIELDS}
    return LatentStats(int(meta["n_tokens"]), int(meta["n_patches"]), arrays, meta)


def top_patches(stats: LatentStats, latent: int) -> list[tuple[int, int, float]]:
    """(image index, patch index, value) of the latent's top-activating training tokens, best first."""
    out = []
    for token, value in zip(stats.top_tokens_ST[latent], stats.top_values_ST[latent]):
        if token >= 0:
            out.append((int(token) // stats.n_patches, int(token) % stats.n_patches, float(value)))
    return out
