"""The activation cache: writer, resumption, readers, the shuffled token stream, the prefetcher."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from saeseg_assets.core.data.cache import (
    ActivationCache,
    CacheError,
    CacheProvenance,
    CacheWriter,
    chunk_spans,
    prefetch,
    token_batches,
)

SETTINGS = CacheProvenance(backbone="toy", backbone_source="toy", layer=0, crop_size=4, patch_size=2, d_model=3,
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
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache(path)
    writer = CacheWriter(path, SETTINGS, [f"img{i}" for i in range(10)], chunk_images=4)
    assert writer.n_written == 8
    writer.write_chunk(8, *_chunk(8, 2))
    writer.finish()
    resumed = ActivationCache(path).read("activations", 0, 10)
    _write(tmp_path / "ref.zarr").finish()
    assert np.array_equal(resumed, ActivationCache(tmp_path / "ref.zarr").read("activations", 0, 10))


def test_a_partial_of_another_chunk_size_is_resumed_with_its_own(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path, chunk=2, upto=4)  # killed after two chunks of 2 images
    writer = CacheWriter(path, SETTINGS, [f"img{i}" for i in range(10)], chunk_images=4)
    assert (writer.n_written, writer.chunk_images) == (4, 2)  # not restarted: the 4 images are kept
    for start in range(4, 10, 2):
        writer.write_chunk(start, *_chunk(start, 2))
    cache = ActivationCache(writer.finish())
    reference = ActivationCache(_write(tmp_path / "ref.zarr", chunk=2).finish())
    assert cache.chunk_images == 2
    assert np.array_equal(cache.read("activations", 0, 10), reference.read("activations", 0, 10))


def test_partial_of_other_settings_starts_over(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path, upto=4)
    other = CacheProvenance(**{**SETTINGS.__dict__, "layer": 1})
    assert CacheWriter(path, other, [f"img{i}" for i in range(10)], chunk_images=4).n_written == 0


def test_incomplete_cache_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path, upto=4)
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache(path)
    with pytest.raises(CacheError, match="no activation cache"):
        ActivationCache(tmp_path / "missing.zarr")


def test_chunks_must_come_in_order(tmp_path):
    writer = CacheWriter(tmp_path / "c.zarr", SETTINGS, [f"img{i}" for i in range(10)], chunk_images=4)
    with pytest.raises(ValueError, match="in order"):
        writer.write_chunk(4, *_chunk(4, 4))
    with pytest.raises(ValueError, match="whole chunk"):
        writer.write_chunk(0, *_chunk(0, 3))


def _shuffled(cache, batch_size, seed, **options):
    return list(token_batches(cache, chunk_spans(cache), batch_size, np.random.default_rng(seed), **options))


def _token_ids(batches) -> list[int]:
    """Image i's patches all hold the value i and carry distinct labels, so (image, label) names a token."""
    return [4 * int(a[0]) + int(label) for b in batches for a, label in zip(b["activations"], b["patch_labels"])]


def test_token_batches_cover_each_token_once(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path).finish()
    cache = ActivationCache(path)
    batches = _shuffled(cache, 5, 0, buffer_images=4, fields=("activations", "patch_labels"))
    assert len(batches) == 8  # 40 tokens, batches of 5
    acts = np.concatenate([b["activations"] for b in batches])[:, 0].astype(int)
    labels = np.concatenate([b["patch_labels"] for b in batches])
    assert sorted(acts.tolist()) == sorted(np.repeat(np.arange(10), 4).tolist())
    # Token labels stay attached to their activations: image i holds labels {i, i+1, i+2, i+3} mod 4.
    for image in range(10):
        assert sorted(labels[acts == image].tolist()) == [0, 1, 2, 3]
    # Shuffled: tokens of several images in one batch; different seeds give different orders.
    assert len(set(batches[0]["activations"][:, 0].tolist())) > 1
    other = np.concatenate([b["activations"] for b in _shuffled(cache, 5, 1, buffer_images=4)])
    assert not np.array_equal(other[:, 0].astype(int), acts)


def test_token_batches_carry_or_yield_the_rest_of_each_fill(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path, n_images=12).finish()
    cache = ActivationCache(path)
    fields = ("activations", "patch_labels")
    # One chunk per fill: three fills of 16 tokens (4 images of 4 patches), batches of 5.
    kept = _shuffled(cache, 5, 0, buffer_images=4, fields=fields, remainder="yield")
    assert [len(b["patch_labels"]) for b in kept] == [5, 5, 5, 1] * 3
    assert sorted(_token_ids(kept)) == list(range(48))  # every token exactly once
    # carry: 16 -> 5 5 5 (1 left), 1 + 16 -> 5 5 5 (2 left), 2 + 16 -> 5 5 5, and only the last 3 tokens are dropped.
    carried = _shuffled(cache, 5, 0, buffer_images=4, fields=fields, remainder="carry")
    assert [len(b["patch_labels"]) for b in carried] == [5] * 9
    ids = _token_ids(carried)
    assert len(set(ids)) == len(ids) == 45 and set(ids) <= set(range(48))
    # Same seed, same span order and first permutation: the first fill's whole batches agree in both modes.
    assert _token_ids(carried[:3]) == _token_ids(kept[:3])
    with pytest.raises(ValueError, match="remainder"):
        _shuffled(cache, 5, 0, remainder="drop")


def test_token_batches_turn_per_image_fields_into_per_token_rows(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path).finish()
    cache = ActivationCache(path)
    one_hot = {"patch_labels": lambda labels_Bhw: np.eye(4, dtype=np.float32)[labels_Bhw.reshape(-1)]}
    batches = _shuffled(cache, 8, 0, buffer_images=8, fields=("activations", "patch_labels"), per_token=one_hot,
                        remainder="yield")
    rows = np.concatenate([b["patch_labels"] for b in batches])
    assert rows.shape == (40, 4) and (rows.sum(1) == 1).all()
    acts = np.concatenate([b["activations"] for b in batches])[:, 0].astype(int)
    for image in range(10):  # each image's four tokens carry its four labels, one each
        assert rows[acts == image].sum(0).tolist() == [1, 1, 1, 1]


def test_token_batches_restrict_to_image_range(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path).finish()
    cache = ActivationCache(path)
    spans = chunk_spans(cache, range(3, 6))
    assert spans == [(3, 4), (4, 6)] and chunk_spans(cache) == [(0, 4), (4, 8), (8, 10)]
    acts = np.concatenate([b["activations"] for b in token_batches(cache, spans, 2, np.random.default_rng(0))])
    assert sorted(set(acts[:, 0].astype(int).tolist())) == [3, 4, 5]
    assert len(acts) == 12


def test_one_generator_goes_on_with_its_stream_across_passes(tmp_path):
    path = tmp_path / "c.zarr"
    _write(path).finish()
    cache = ActivationCache(path)
    rng = np.random.default_rng(0)
    fields = ("activations", "patch_labels")
    first, second = (_token_ids(token_batches(cache, chunk_spans(cache), 40, rng, fields=fields)) for _ in range(2))
    assert sorted(first) == sorted(second) == list(range(40)) and first != second
    assert first == _token_ids(_shuffled(cache, 40, 0, fields=("activations", "patch_labels")))


def test_prefetch_runs_ahead_reraises_errors_and_stops_when_closed():
    assert list(prefetch(iter(range(5)), depth=2)) == [0, 1, 2, 3, 4]

    def failing():
        yield 1
        raise OSError("disk gone")

    stream = prefetch(failing())
    assert next(stream) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(stream)

    closed = threading.Event()

    def endless():
        try:
            yield from itertools.count()
        finally:
            closed.set()

    stream = prefetch(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert closed.is_set()  # the producer thread has finished and closed the generator it ran
