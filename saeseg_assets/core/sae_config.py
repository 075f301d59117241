"""The SAE's training settings: one frozen record whose fields document themselves, and its key.

Free of torch, so that the Dagster config class can take its defaults from here at import time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

# Gao et al. (2024) call a latent dead after 10M tokens without firing; small caches need a shorter window.
MAX_DEAD_TOKENS = 10_000_000
_TOPK_ONLY = ("k", "aux_k", "aux_coeff", "dead_tokens")
_RELU_ONLY = ("l1_coeff",)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (with the training cache); documented field by field."""

    architecture: str = "topk"  # "topk" (k largest pre-activations fire, AuxK for dead latents) or "relu" (reference)
    expansion: int = 16  # d_sae = expansion * d_model
    k: int = 32  # latents active per token (topk)
    l1_coeff: float = 4e-3  # weight of sum|f| per token in the relu loss, on unit-variance inputs (demo: L0 ~ 65)
    aux_k: int = 0  # dead latents that model the residual in the AuxK loss; 0: d_model // 2
    aux_coeff: float = 1 / 32  # weight of the AuxK loss
    dead_tokens: int = 0  # tokens without firing after which a latent counts as dead; 0: half a pass over the cache
    lr: float = 2e-3  # Adam's peak learning rate
    warmup_steps: int = 50  # linear warm-up from 0 to lr
    decay_fraction: float = 0.8  # final share of the steps over which lr falls linearly to 0
    grad_clip: float = 1.0  # global gradient-norm clip
    batch_size: int = 1024  # tokens per step
    train_tokens: int = 614_400  # tokens to train on in all (600 steps, 10 passes over the embedded demo's cache)
    seed: int = 0  # initialization and data order
    buffer_images: int = 64  # images whose tokens are mixed in the shuffle buffer
    device: str = "cpu"  # "cpu" or "cuda"
    bf16: bool = False  # bf16 autocast for the encoder matmul (meant for cuda)

    @property
    def total_steps(self) -> int:
        return max(1, self.train_tokens // self.batch_size)

    def key(self, cache_fingerprint: str) -> str:
        """Equal keys mean equal training: same settings on the same cache (settings the architecture ignores
        do not count)."""
        ignored = _RELU_ONLY if self.architecture == "topk" else _TOPK_ONLY
        settings = {name: value for name, value in asdict(self).items() if name not in ignored}
        blob = json.dumps({"config": settings, "cache": cache_fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
