"""Measuring an SAE on held-out tokens: reconstruction (FVU, MSE) and sparsity (L0, dead and dense latents).

All figures are totals over the whole evaluation set, accumulated block by block in float64.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.cache import ActivationCache, chunk_spans, token_batches
from ..store.artifacts import write_atomic
from ..study.latent_stats import dense_mask
from .model import Sae

FORMAT_VERSION = 1  # of evaluation.json
EVALUATION_FILE = "evaluation.json"


@dataclass(frozen=True)
class SaeMetrics:
    """Figures over a whole evaluation set."""

    fvu: float  # sum ||x - x_hat||^2 / sum ||x - mean||^2, mean taken over the whole set
    mse: float  # sum ||x - x_hat||^2 / (tokens * d_model), in the activations' units
    l0: float  # active latents per token
    dead_fraction: float  # share of latents that never fire on the set
    dense_fraction: float  # share of dense latents (`latents.dense_mask`: firing on at least 1% of the tokens)
    n_tokens: int


class EvalTotals:
    """Running sums over an evaluation set, so that its figures are whole-set totals, not means of batch figures."""

    def __init__(self, d_model: int, d_sae: int):
        self.n = 0
        self.shift_D: torch.Tensor | None = None  # the first batch's mean: sums around it do not cancel badly
        self.sum_x_D = torch.zeros(d_model, dtype=torch.float64)
        self.sum_sq_x = 0.0
        self.sum_sq_err = 0.0
        self.fires_S = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, x_ND: torch.Tensor, x_hat_ND: torch.Tensor, fires_S: torch.Tensor) -> None:
        """One batch: inputs, reconstructions, and on how many of its tokens each latent fired."""
        x_ND, x_hat_ND = x_ND.detach().double().cpu(), x_hat_ND.detach().double().cpu()
        if self.shift_D is None:
            self.shift_D = x_ND.mean(0)
        self.n += len(x_ND)
        self.sum_sq_err += float((x_ND - x_hat_ND).pow(2).sum())
        x_ND = x_ND - self.shift_D
        self.sum_x_D += x_ND.sum(0)
        self.sum_sq_x += float(x_ND.pow(2).sum())
        self.fires_S += fires_S.detach().double().cpu()

    def metrics(self) -> SaeMetrics:
        n, d = max(self.n, 1), len(self.sum_x_D)
        # sum ||x - mean||^2 = sum ||x - shift||^2 - n ||mean - shift||^2, in float64
        total_var = self.sum_sq_x - float(self.sum_x_D.pow(2).sum()) / n
        return SaeMetrics(fvu=self.sum_sq_err / total_var if total_var > 0 else float("nan"),
                          mse=self.sum_sq_err / (n * d),
                          l0=float(self.fires_S.sum()) / n,
                          dead_fraction=float((self.fires_S == 0).double().mean()),
                          dense_fraction=float(dense_mask(self.fires_S / n).double().mean()),
                          n_tokens=self.n)


@torch.no_grad()
def evaluate_sae(sae: Sae, cache: ActivationCache, device: str = "cpu", block_images: int | None = None) -> SaeMetrics:
    """Reconstruction and sparsity of `sae` over every token of `cache`, read block by block."""
    if sae.spec.d_model != cache.d_model:
        raise ValueError(f"the SAE has d_model {sae.spec.d_model}, {cache.path} holds d_model {cache.d_model}")
    sae = sae.to(device).eval()
    totals = EvalTotals(sae.spec.d_model, sae.spec.d_sae)
    for _, block in cache.iter_blocks(("activations",), block_images):
        _add(totals, sae, torch.from_numpy(block["activations"]).reshape(-1, cache.d_model).to(device).float())
    return totals.metrics()


@torch.no_grad()
def sample_metrics(sae: Sae, x_ND: torch.Tensor, block_tokens: int = 4096) -> SaeMetrics:
    """The same figures over a sample of tokens held in memory (the sample's own mean for FVU)."""
    totals = EvalTotals(sae.spec.d_model, sae.spec.d_sae)
    for start in range(0, len(x_ND), block_tokens):
        _add(totals, sae, x_ND[start:start + block_tokens].float())
    return totals.metrics()


def _add(totals: EvalTotals, sae: Sae, x_ND: torch.Tensor) -> None:
    vals_NK, idx_NK = sae.encode(x_ND)
    fires_S = torch.bincount(idx_NK[vals_NK > 0], minlength=sae.spec.d_sae)
    totals.add(x_ND, sae.decode(vals_NK, idx_NK), fires_S)


def token_sample(cache: ActivationCache, n_tokens: int, seed: int, buffer_images: int) -> np.ndarray:
    """min(n_tokens, all) tokens [n, d_model] drawn without replacement from shuffled whole chunks, `buffer_images`
    images mixed at a time: the first batch of a shuffled pass whose order `seed` fixes."""
    n = min(n_tokens, cache.n_tokens)
    batches = token_batches(cache, chunk_spans(cache), n, np.random.default_rng(seed), buffer_images=buffer_images)
    return next(batches)["activations"]


def save_evaluation(folder: Path, metrics: SaeMetrics) -> Path:
    """Writes evaluation.json: the fields of `SaeMetrics`."""
    path = Path(folder) / EVALUATION_FILE
    write_atomic(path, json.dumps(asdict(metrics), indent=2).encode())
    return path


def load_evaluation(folder: Path) -> SaeMetrics:
    path = Path(folder) / EVALUATION_FILE
    return SaeMetrics(**json.loads(path.read_text()))
