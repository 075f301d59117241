"""Latent statistics (against a brute-force computation) and the class-latent selection rules (on hand-made tables)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saeseg_assets.core.data.cache import ActivationCache, CacheProvenance, CacheWriter
from saeseg_assets.core.sae.model import Sae, SaeSpec
from saeseg_assets.core.settings import SelectionSettings, StatsSettings
from saeseg_assets.core.study.latent_stats import (
    LatentStats,
    compute_latent_stats,
    dense_mask,
    load_latent_stats,
    merge_top,
    save_latent_stats,
    top_patches,
)
from saeseg_assets.core.study.rules import f1_scores, select_class_latents


def write_cache(path, acts_BPD, labels_Bhw, purity_Bhw, chunk=2) -> ActivationCache:
    n, p, d = acts_BPD.shape
    grid = int(round(p ** 0.5))
    settings = CacheProvenance(backbone="toy", backbone_source="toy", layer=0, crop_size=2 * grid, patch_size=2,
                             d_model=d, dataset_root="/nowhere", split="training", preprocessing="none",
                             dtype="float32")
    writer = CacheWriter(path, settings, [f"img{i}" for i in range(n)], chunk_images=chunk)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        pixels = np.repeat(np.repeat(labels_Bhw[a:b], 2, 1), 2, 2)
        writer.write_chunk(a, acts_BPD[a:b], labels_Bhw[a:b], purity_Bhw[a:b], pixels)
    return ActivationCache(writer.finish())


def random_sae(architecture: str, d_model=6, d_sae=10, k=3, seed=0) -> Sae:
    gen = torch.Generator().manual_seed(seed)
    sae = Sae(SaeSpec(architecture, d_model, d_sae, k if architecture == "topk" else 0))
    with torch.no_grad():
        sae.W_enc_SD.copy_(torch.randn(d_sae, d_model, generator=gen))
        sae.W_dec_SD.copy_(torch.nn.functional.normalize(torch.randn(d_sae, d_model, generator=gen), dim=1))
        sae.b_enc_S.copy_(torch.randn(d_sae, generator=gen) * 0.5 - 0.5)
    return sae


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_stats_equal_brute_force(tmp_path, architecture):
    rng = np.random.default_rng(0)
    n, grid, d = 5, 3, 6
    acts = rng.standard_normal((n, grid * grid, d)).astype(np.float32)
    labels = rng.choice([0, 3, 10, 21], size=(n, grid, grid)).astype(np.uint8)
    purity = rng.choice([0.5, 0.9, 1.0], size=(n, grid, grid)).astype(np.float32)
    cache = write_cache(tmp_path / "c.zarr", acts, labels, purity)
    sae = random_sae(architecture)
    stats = compute_latent_stats(sae, cache, StatsSettings(purity=0.9, top_patches=4, block_images=2),
                                 log=lambda _: None)

    with torch.no_grad():
        vals, idx = sae.encode(torch.from_numpy(acts.reshape(-1, d)))
        codes = torch.zeros(len(vals), sae.spec.d_sae).scatter(1, idx, vals).numpy().astype(np.float64)
    lab, pure = labels.reshape(-1), purity.reshape(-1) >= 0.9
    fires = codes > 0
    assert stats.n_tokens == n * grid * grid
    np.testing.assert_array_equal(stats.fire_count_S, fires.sum(0))
    np.testing.assert_allclose(stats.act_sum_S, codes.sum(0), rtol=1e-6)
    np.testing.assert_allclose(stats.act_max_S, codes.max(0), rtol=1e-6)
    for c in range(151):
        on = lab == c
        assert stats.class_patches_C[c] == on.sum()
        assert stats.pure_patches_C[c] == (on & pure).sum()
        np.testing.assert_array_equal(stats.class_fire_count_CS[c], fires[on].sum(0))
        np.testing.assert_allclose(stats.class_act_sum_CS[c], codes[on].sum(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(stats.pure_fire_count_CS[c], fires[on & pure].sum(0))
        np.testing.assert_allclose(stats.pure_act_sum_CS[c], codes[on & pure].sum(0), rtol=1e-6, atol=1e-9)
    for s in range(sae.spec.d_sae):
        # Brute force: sort by (-value, token), keep the 4 best firing tokens of distinct images.
        ranked = sorted((t for t in range(len(codes)) if codes[t, s] > 0), key=lambda t: (-codes[t, s], t))
        order = [t for i, t in enumerate(ranked) if all(t // 9 != u // 9 for u in ranked[:i])][:4]
        assert [tok for tok in stats.top_tokens_ST[s] if tok >= 0] == order
        np.testing.assert_allclose(stats.top_values_ST[s][: len(order)], codes[order, s], rtol=1e-6)
    patches = top_patches(stats, 0)
    assert all(img * 9 + p == t for (img, p, _), t in zip(patches, stats.top_tokens_ST[0]))


def test_merge_top_keeps_best_and_breaks_ties_by_token():
    values, tokens = torch.zeros(2, 2), torch.full((2, 2), -1, dtype=torch.int64)
    values, tokens = merge_top(values, tokens, torch.tensor([0, 0, 0, 1]), torch.tensor([1.0, 3.0, 1.0, 2.0]),
                               torch.tensor([5, 6, 4, 7]), n_patches=1)
    assert tokens.tolist() == [[6, 4], [7, -1]] and values.tolist() == [[3.0, 1.0], [2.0, 0.0]]
    values, tokens = merge_top(values, tokens, torch.tensor([0, 1]), torch.tensor([2.0, 0.5]), torch.tensor([9, 8]),
                               n_patches=1)
    assert tokens.tolist() == [[6, 9], [7, 8]]


def test_merge_top_keeps_one_token_per_image():
    """Tokens 0-3 are image 0, 4-7 image 1, 8-11 image 2: image 0's second-best token (3.0) loses its place to
    image 1's best (2.0), even across two merges."""
    values, tokens = torch.zeros(1, 3), torch.full((1, 3), -1, dtype=torch.int64)
    values, tokens = merge_top(values, tokens, torch.tensor([0, 0, 0]), torch.tensor([4.0, 3.0, 2.0]),
                               torch.tensor([1, 2, 5]), n_patches=4)
    assert tokens.tolist() == [[1, 5, -1]] and values.tolist() == [[4.0, 2.0, 0.0]]
    values, tokens = merge_top(values, tokens, torch.tensor([0, 0]), torch.tensor([5.0, 1.0]), torch.tensor([3, 9]),
                               n_patches=4)
    assert tokens.tolist() == [[3, 5, 9]] and values.tolist() == [[5.0, 2.0, 1.0]]


def hand_stats() -> LatentStats:
    """4 latents, classes 0 (other), 3 and 10; 100 tokens: 40 of class 3 (30 pure), 20 of class 10 (20 pure)."""
    C, S = 151, 4
    arrays = {name: np.zeros((C, S)) for name in ("class_fire_count_CS", "class_act_sum_CS", "pure_fire_count_CS",
                                                  "pure_act_sum_CS")}
    arrays["class_patches_C"] = np.zeros(C, dtype=np.int64)
    arrays["pure_patches_C"] = np.zeros(C, dtype=np.int64)
    arrays["class_patches_C"][[0, 3, 10]] = [40, 40, 20]
    arrays["pure_patches_C"][[0, 3, 10]] = [30, 30, 20]
    # Latent 0: fires on all 30 pure class-3 patches and nowhere else (F1 = 1 for class 3).
    # Latent 1: dense, fires on every patch, large sums. Latent 2: fires on 10 pure class-3 patches, strongly.
    # Latent 3: never fires.
    arrays["pure_fire_count_CS"][3] = [30, 30, 10, 0]
    arrays["pure_fire_count_CS"][0] = [0, 30, 0, 0]
    arrays["pure_fire_count_CS"][10] = [0, 20, 0, 0]
    arrays["class_fire_count_CS"][3] = [30, 40, 10, 0]
    arrays["class_act_sum_CS"][3] = [30.0, 400.0, 50.0, 0.0]
    arrays["fire_count_S"] = np.array([30, 100, 10, 0])
    arrays["act_sum_S"] = np.array([30.0, 1000.0, 50.0, 0.0])
    arrays["act_max_S"] = np.array([1.0, 10.0, 5.0, 0.0], dtype=np.float32)
    arrays["top_values_ST"] = np.zeros((S, 2), dtype=np.float32)
    arrays["top_tokens_ST"] = np.full((S, 2), -1)
    return LatentStats(100, 4, arrays, {"purity": 0.9})


def test_f1_rule_on_a_hand_made_table():
    stats = hand_stats()
    # Class 3 over 80 pure patches: latent 0: TP 30, fired 30 -> 2*30/(30+30) = 1; latent 1: 2*30/(80+30);
    # latent 2: 2*10/(10+30) = 0.5.
    np.testing.assert_allclose(f1_scores(stats, 3)[:3], [1.0, 60 / 110, 0.5])
    chosen = select_class_latents(stats, 3, SelectionSettings(rule="f1", k=2))
    assert chosen.latents == (0, 1) and chosen.scores == pytest.approx((1.0, 60 / 110))
    assert chosen.details[0]["precision"] == 1.0 and chosen.details[0]["recall"] == 30 / 40


def test_activation_sum_rule_drops_dense_latents():
    stats = hand_stats()
    chosen = select_class_latents(stats, 3, SelectionSettings(rule="activation_sum", k=3, dense_frequency=0.5))
    # Latent 1 fires on 100% of tokens: dropped despite the largest sum; latent 3 never fires: not chosen.
    assert chosen.latents == (2, 0) and chosen.scores == (50.0, 30.0)
    loose = select_class_latents(stats, 3, SelectionSettings(rule="activation_sum", k=1, dense_frequency=1.01))
    assert loose.latents == (1,)


def test_dense_means_firing_on_at_least_the_threshold_share():
    frequency_S = np.array([0.0, 0.0099, 0.01, 0.5])
    assert dense_mask(frequency_S).tolist() == [False, False, True, True]  # the default threshold: 1%
    assert dense_mask(torch.tensor(frequency_S), 0.5).tolist() == [False, False, False, True]


def test_absent_class_and_no_pure_patches():
    stats = hand_stats()
    absent = select_class_latents(stats, 21, SelectionSettings(rule="f1"))
    assert absent.latents == () and "absent from the training cache" in absent.reason
    stats.pure_patches_C[10] = 0
    no_pure = select_class_latents(stats, 10, SelectionSettings(rule="f1"))
    assert no_pure.latents == () and "pure" in no_pure.reason
    # Class 10 has patches, but the only latent firing there is dense: nothing to choose.
    none = select_class_latents(stats, 10, SelectionSettings(rule="activation_sum", dense_frequency=0.5))
    assert none.latents == () and "no latent scores above 0" in none.reason


def test_round_trip(tmp_path):
    stats = hand_stats()
    save_latent_stats(tmp_path, stats, {"sae_sha256": "abc"})
    back = load_latent_stats(tmp_path)
    assert back.n_tokens == 100 and back.meta["sae_sha256"] == "abc"
    for name, array in stats.arrays.items():
        np.testing.assert_array_equal(back.arrays[name], array)
    assert math.isclose(back.frequency_S[1], 1.0)
