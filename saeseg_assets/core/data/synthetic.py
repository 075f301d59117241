"""Synthetic activation caches with a known sparse structure, for the SAE's tests and benchmark.

Each token is a mean plus a few of many random unit directions with random positive weights, plus noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import ActivationCache, CacheProvenance, CacheWriter


def write_sparse_cache(path: Path, n_images: int = 32, grid: int = 8, d_model: int = 32, n_features: int = 128,
                       active: int = 4, noise: float = 0.05, seed: int = 0, chunk_images: int = 8,
                       split: str = "training", dictionary_seed: int = 1234) -> ActivationCache:
    """Writes and opens a cache whose tokens are sparse sums of `n_features` directions (`active` per token).

    The directions and the mean depend only on `dictionary_seed`, so caches of different `seed` (say, a training
    and a validation split) share one structure.
    """
    dict_rng, rng = np.random.default_rng(dictionary_seed), np.random.default_rng(seed)
    features_FD = dict_rng.standard_normal((n_features, d_model))
    features_FD /= np.linalg.norm(features_FD, axis=1, keepdims=True)
    mean_D = dict_rng.standard_normal(d_model) * 2.0
    # Some features are far more common than others, as in real models.
    popularity_F = dict_rng.pareto(1.5, n_features) + 1.0
    popularity_F /= popularity_F.sum()
    n_patches = grid * grid
    settings = CacheProvenance(backbone="synthetic", backbone_source=f"sparse:{dictionary_seed}", layer=0,
                             crop_size=2 * grid, patch_size=2, d_model=d_model, dataset_root="synthetic",
                             split=split, preprocessing=f"seed={seed},active={active},noise={noise}")
    writer = CacheWriter(Path(path), settings, [f"{split}_{i:05d}" for i in range(n_images)], chunk_images)
    for start in range(0, n_images, chunk_images):
        n = min(chunk_images, n_images - start)
        tokens = n * n_patches
        which_TA = np.stack([rng.choice(n_features, active, replace=False, p=popularity_F) for _ in range(tokens)])
        weights_TA = rng.exponential(1.0, (tokens, active)) + 0.5
        acts_TD = mean_D + np.einsum("ta,tad->td", weights_TA, features_FD[which_TA])
        acts_TD += noise * rng.standard_normal((tokens, d_model))
        labels = rng.integers(0, 4, (n, grid, grid), dtype=np.uint8)
        writer.write_chunk(start, acts_TD.reshape(n, n_patches, d_model).astype(np.float32), labels,
                           np.ones((n, grid, grid), np.float32), np.repeat(np.repeat(labels, 2, 1), 2, 2))
    return ActivationCache(writer.finish())
