"""The draws of a setting's two controls: random latents matched in firing frequency, and a random unit direction;
one seeded stream per (seed, class, draw), so every class's controls are reproducible on their own."""

from __future__ import annotations

import numpy as np
import torch

from ..settings import SuppressionSettings


def matched_latents(frequency_S: np.ndarray, latents: tuple[int, ...], rng: np.random.Generator,
                    pool: int) -> tuple[int, ...]:
    """For each chosen latent, a different latent drawn among the `pool` nearest to it in log firing frequency."""
    log_f = np.log10(np.maximum(frequency_S, 1e-12))
    free = np.ones(len(frequency_S), dtype=bool)
    free[list(latents)] = False
    out = []
    for i in latents:
        distance = np.where(free, np.abs(log_f - log_f[i]), np.inf)
        nearest = smallest(distance, pool)
        pick = int(rng.choice(nearest))
        out.append(pick)
        free[pick] = False
    return tuple(out)


def smallest(distance: np.ndarray, n: int) -> np.ndarray:
    """The indices of the n smallest finite values, ties to the lower index: a stable argsort's first n, found with a
    partition (linear) rather than a sort, since it runs for every latent of every control draw."""
    n = min(n, len(distance))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    kth = np.partition(distance, n - 1)[n - 1]
    below = np.flatnonzero(distance < kth)
    below = below[np.lexsort((below, distance[below]))]
    nearest = np.concatenate([below, np.flatnonzero(distance == kth)[:n - len(below)]])
    return nearest[np.isfinite(distance[nearest])]


def random_direction(d_model: int, rng: np.random.Generator) -> torch.Tensor:
    u = rng.standard_normal(d_model)
    return torch.from_numpy(u / np.linalg.norm(u)).float()


def control_draws(frequency_S: np.ndarray, d_model: int, class_index: int, latents: tuple[int, ...],
                  config: SuppressionSettings) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Per seed, (random latents, random unit direction)."""
    draws = []
    for s in range(config.control_seeds):
        rng_latents = np.random.default_rng([config.seed, class_index, s, 0])
        rng_direction = np.random.default_rng([config.seed, class_index, s, 1])
        draws.append((matched_latents(frequency_S, latents, rng_latents, config.frequency_pool),
                      random_direction(d_model, rng_direction)))
    return draws
