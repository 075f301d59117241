"""The activation cache: writer, resumption, atomic publication, readers."""

from __future__ import annotations

import numpy as np
import pytest

from saeseg_assets.core.cache import (
    ActivationCache,
    CacheError,
    CacheSettings,
    CacheWriter,
    complete_cache,
    token_batches,
)

SETTINGS = CacheSettings(backbone="toy", backbone_source="toy", layer=0, crop_size=4, patch_size=2, d_model=3,
                         dataset_root="/nowhere", split="training", preprocessing="none")


def _chunk(start: int, n: int):
    """Image i's activations are all equal to i, patch p of image i has label (i + p) % 4."""
    acts = np.repeat(np.arange(start, start + n, dtype=np.float32), 4 * 3).reshape(n, 4, 3)
    labels = ((np.arange(start, start + n)[:, None] + np.arange(4)[None, :]) % 4).reshape(n, 2, 2).astype(np.uint8)
    purity = np.full((n, 2, 2), 0.5, dtype=np.float32)
    pixels = np.zeros((n, 4, 4), dtype=np.uint8)
    return acts, labels, purity, pixels


def _write(path, n_images=10, chunk=4, settings=SETTINGS, upto=None):
    writer = CacheWriter(path, settings, [f"img{i}" for i in range(n_images)], chunk_images=chunk)
    for start in range(writer.n_written, n_images if upto is None else upto, chunk):
        writer.write_chunk(start, *_chunk(start, min(chunk, n_images - start)))
    return writer


def test_round_trip(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path).finish()
    cache = ActivationCache(path)
    assert (cache.n_images, cache.n_patches, cache.d_model, cache.grid) == (10, 4, 3, 2)
    assert cache.image_ids() == [f"img{i}" for i in range(10)]
    assert cache.settings == SETTINGS
    assert cache.read("activations", 7, 8).dtype == np.float16
    assert float(cache.read("activations", 7, 8)[0, 3, 2]) == 7.0
    blocks = list(cache.iter_blocks(("activations", "patch_labels")))
    assert [start for start, _ in blocks] == [0, 4, 8]
    assert blocks[2][1]["activations"].shape == (2, 4, 3)
    assert blocks[1][1]["patch_labels"][1].ravel().tolist() == [1, 2, 3, 0]  # image 5


def test_resume_continues_at_last_complete_chunk(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path, upto=8)  # two chunks, then the process "dies"
    assert complete_cache(path) is None
    writer = CacheWriter(path, SETTINGS, [f"img{i}" for i in range(10)], chunk_images=4)
    assert writer.n_written == 8
    writer.write_chunk(8, *_chunk(8, 2))
    writer.finish()
    resumed = ActivationCache(path).read("activations", 0, 10)
    _write(tmp_path / "ref.zarr").finish()
    assert np.array_equal(resumed, ActivationCache(tmp_path / "ref.zarr").read("activations", 0, 10))


def test_partial_of_other_settings_starts_over(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path, upto=4)
    other = CacheSettings(**{**SETTINGS.__dict__, "layer": 1})
    assert CacheWriter(path, other, [f"img{i}" for i in range(10)], chunk_images=4).n_written == 0


def test_incomplete_cache_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path, upto=4)
    with pytest.raises(CacheError, match="unfinished recording"):
        ActivationCache(path)
    with pytest.raises(CacheError, match="no activation cache"):
        ActivationCache(tmp_path / "missing.zarr")


def test_old_cache_stays_until_new_one_is_complete(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path).finish()
    other = CacheSettings(**{**SETTINGS.__dict__, "layer": 1})
    writer = _write(path, settings=other, upto=4)
    assert ActivationCache(path).settings.layer == 0  # still the old, complete one
    writer.write_chunk(4, *_chunk(4, 4))
    writer.write_chunk(8, *_chunk(8, 2))
    writer.finish()
    assert ActivationCache(path).settings.layer == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr"]


def test_chunks_must_come_in_order(tmp_path):
    writer = CacheWriter(tmp_path / "c.zarr", SETTINGS, [f"img{i}" for i in range(10)], chunk_images=4)
    with pytest.raises(ValueError, match="in order"):
        writer.write_chunk(4, *_chunk(4, 4))
    with pytest.raises(ValueError, match="whole chunk"):
        writer.write_chunk(0, *_chunk(0, 3))


def test_token_batches_cover_each_token_once(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path).finish()
    cache = ActivationCache(path)
    batches = list(token_batches(cache, batch_size=5, seed=0, buffer_images=4, fields=("activations", "patch_labels")))
    assert len(batches) == 8  # 40 tokens, batches of 5
    acts = np.concatenate([b["activations"] for b in batches])[:, 0].astype(int)
    labels = np.concatenate([b["patch_labels"] for b in batches])
    assert sorted(acts.tolist()) == sorted(np.repeat(np.arange(10), 4).tolist())
    # Token labels stay attached to their activations: image i holds labels {i, i+1, i+2, i+3} mod 4.
    for image in range(10):
        assert sorted(labels[acts == image].tolist()) == [0, 1, 2, 3]
    # Shuffled: tokens of several images in one batch; different seeds give different orders.
    assert len(set(batches[0]["activations"][:, 0].tolist())) > 1
    other = np.concatenate([b["activations"] for b in token_batches(cache, 5, seed=1, buffer_images=4)])
    assert not np.array_equal(other[:, 0].astype(int), acts)


def test_token_batches_restrict_to_image_range(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path).finish()
    cache = ActivationCache(path)
    acts = np.concatenate([b["activations"] for b in token_batches(cache, 2, seed=0, images=range(3, 6))])
    assert sorted(set(acts[:, 0].astype(int).tolist())) == [3, 4, 5]
    assert len(acts) == 12
