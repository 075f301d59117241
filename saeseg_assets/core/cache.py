"""Zarr activation caches: a resumable, atomic writer and the one streaming reader.

Layout and attributes are documented in the README ("Activation cache").
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr

FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
_PROGRESS_FILE = "progress.json"


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, or made with other settings than asked for."""


@dataclass(frozen=True)
class CacheSettings:
    """Everything that decides a cache's contents; two caches with equal settings hold equal data."""

    backbone: str
    backbone_source: str
    layer: int
    crop_size: int
    patch_size: int
    d_model: int
    dataset_root: str
    split: str
    preprocessing: str
    dtype: str = "float16"

    @property
    def grid(self) -> int:
        return self.crop_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid


def fingerprint(settings: CacheSettings, image_ids: Sequence[str]) -> str:
    """A short content key: equal for caches that must hold equal data."""
    blob = json.dumps({"format": FORMAT_VERSION, **asdict(settings), "image_ids": list(image_ids)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


class CacheWriter:
    """Writes a cache chunk by chunk into `<path>.partial`, resumable after a crash; `finish()` publishes it at `path`.

    A chunk is `chunk_images` whole images; progress is recorded only after a chunk is fully written, so a killed run
    resumes at the last complete chunk. The previous cache at `path` stays readable until the new one is complete.
    """

    def __init__(self, path: Path, settings: CacheSettings, image_ids: Sequence[str], chunk_images: int = 16):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.settings = settings
        self.image_ids = list(image_ids)
        self.chunk_images = chunk_images
        self.key = fingerprint(settings, self.image_ids)
        self.n_written = self._open_or_resume()

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def _open_or_resume(self) -> int:
        progress_file = self.partial / _PROGRESS_FILE
        if progress_file.exists():
            progress = json.loads(progress_file.read_text())
            if progress.get("fingerprint") == self.key and progress.get("chunk_images") == self.chunk_images:
                self._group = zarr.open_group(str(self.partial), mode="r+")
                return int(progress["n_written"])
        # A partial cache of other settings is of no use: start afresh.
        shutil.rmtree(self.partial, ignore_errors=True)
        self._create()
        _write_json_atomic(progress_file, {"fingerprint": self.key, "chunk_images": self.chunk_images, "n_written": 0})
        return 0

    def _create(self) -> None:
        s, n, c = self.settings, self.n_images, self.chunk_images
        g = zarr.open_group(str(self.partial), mode="w")
        # Activations are read far more often than written and barely compress: store them raw.
        g.create_array("activations", shape=(n, s.n_patches, s.d_model), chunks=(c, s.n_patches, s.d_model),
                       dtype=s.dtype, compressors=None)
        g.create_array("patch_labels", shape=(n, s.grid, s.grid), chunks=(c, s.grid, s.grid), dtype="uint8")
        g.create_array("patch_purity", shape=(n, s.grid, s.grid), chunks=(c, s.grid, s.grid), dtype="float32")
        g.create_array("pixel_labels", shape=(n, s.crop_size, s.crop_size), chunks=(c, s.crop_size, s.crop_size),
                       dtype="uint8")
        ids = g.create_array("image_ids", shape=(n,), chunks=(max(n, 1),), dtype=str)
        if n:
            ids[:] = np.array(self.image_ids)
        g.attrs.update({**asdict(s), "format_version": FORMAT_VERSION, "fingerprint": self.key,
                        "n_images": n, "n_patches": s.n_patches, "grid": s.grid, "complete": False})
        self._group = g

    def write_chunk(self, start: int, acts_BPD: np.ndarray, patch_labels_Bhw: np.ndarray,
                    patch_purity_Bhw: np.ndarray, pixel_labels_BHW: np.ndarray) -> None:
        """Writes images [start, start + B): one whole chunk (or the last, shorter one), in order."""
        if start != self.n_written or start % self.chunk_images:
            raise ValueError(f"chunks must be written in order: expected start {self.n_written}, got {start}")
        stop = start + len(acts_BPD)
        if stop != min(start + self.chunk_images, self.n_images):
            raise ValueError(f"chunk at {start} holds {len(acts_BPD)} images, expected a whole chunk")
        g = self._group
        g["activations"][start:stop] = acts_BPD.astype(self.settings.dtype, copy=False)
        g["patch_labels"][start:stop] = patch_labels_Bhw
        g["patch_purity"][start:stop] = patch_purity_Bhw
        g["pixel_labels"][start:stop] = pixel_labels_BHW
        self.n_written = stop
        _write_json_atomic(self.partial / _PROGRESS_FILE,
                           {"fingerprint": self.key, "chunk_images": self.chunk_images, "n_written": stop})

    def finish(self, extra_attrs: dict | None = None) -> Path:
        """Marks the cache complete and swaps it in at `path` (the old one is removed only after the swap)."""
        if self.n_written != self.n_images:
            raise CacheError(f"{self.partial}: finish() after {self.n_written} of {self.n_images} images")
        self._group.attrs.update({**(extra_attrs or {}), "complete": True})
        (self.partial / _PROGRESS_FILE).unlink()
        old = self.path.with_name(self.path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(self.partial, self.path)
        shutil.rmtree(old, ignore_errors=True)
        return self.path


class ActivationCache:
    """Read access to a complete cache. All reads are block reads of whole images."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
            hint = f" (an unfinished recording lies at {partial}: materialize it again to resume)" if partial.exists() else ""
            raise CacheError(f"{self.path}: no activation cache here{hint}")
        self.group = zarr.open_group(str(self.path), mode="r")
        self.attrs = self.group.attrs.asdict()
        if not self.attrs.get("complete"):
            raise CacheError(f"{self.path}: the activation cache is incomplete; materialize it again to finish it")
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{self.path}: cache format {self.attrs.get('format_version')}, expected {FORMAT_VERSION}")
        self.activations = self.group["activations"]
        self.n_images, self.n_patches, self.d_model = self.activations.shape
        self.grid = int(self.attrs["grid"])
        self.chunk_images = self.activations.chunks[0]

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["fingerprint"])

    @property
    def n_tokens(self) -> int:
        return self.n_images * self.n_patches

    @property
    def settings(self) -> CacheSettings:
        fields = CacheSettings.__dataclass_fields__
        return CacheSettings(**{k: self.attrs[k] for k in fields})

    def image_ids(self) -> list[str]:
        return [str(x) for x in self.group["image_ids"][:]]

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.group[name][start:stop])

    def iter_blocks(self, fields: Sequence[str] = ("activations",), block_images: int | None = None,
                    start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yields (first image index, {field: array}) over images [start, stop), in order, chunk-aligned blocks,
        reading the next block in a background thread while the caller works on this one."""
        stop = self.n_images if stop is None else stop
        step = block_images or self.chunk_images
        starts = list(range(start, stop, step))

        def load(i: int) -> dict[str, np.ndarray]:
            return {f: self.read(f, i, min(i + step, stop)) for f in fields}

        yield from zip(starts, _prefetched(load, starts))


def complete_cache(path: Path) -> ActivationCache | None:
    """The complete cache at `path`, or None where there is none (missing, unfinished, or of another format)."""
    try:
        return ActivationCache(path)
    except CacheError:
        return None


def _prefetched(load, items: Sequence, depth: int = 2) -> Iterator:
    """Maps `load` over `items` in one background thread, `depth` results ahead; errors surface in the caller."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop_flag = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop_flag.is_set():
                    return
                out.put((True, load(item)))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            out.put((False, exc))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        for _ in items:
            ok, value = out.get()
            if not ok:
                raise value
            yield value
    finally:
        stop_flag.set()
        while thread.is_alive():
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)


def token_batches(cache: ActivationCache, batch_size: int, *, seed: int, images: range | None = None,
                  buffer_images: int = 256, fields: Sequence[str] = ("activations",)) -> Iterator[dict[str, np.ndarray]]:
    """One shuffled pass over the tokens of `images` (default: all), as dicts of [batch, ...] arrays.

    Reads whole chunks in a random order into a buffer of about `buffer_images` images (many images mixed), shuffles the
    buffer's tokens and cuts batches; the last, shorter batch is dropped. Memory is bounded by the buffer, not the data.
    Per-image fields (`patch_labels`, `patch_purity`) are flattened to per-token values alongside the activations.
    """
    images = images if images is not None else range(cache.n_images)
    rng = np.random.default_rng(seed)
    c = cache.chunk_images
    # Chunk-aligned spans that cover `images` exactly.
    edges = sorted({images.start, images.stop, *range((images.start // c + 1) * c, images.stop, c)})
    spans = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    spans = [spans[i] for i in rng.permutation(len(spans))]
    per_fill = max(1, buffer_images // c)
    groups = [spans[i:i + per_fill] for i in range(0, len(spans), per_fill)]

    def load(group: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        return {f: np.concatenate([_tokens(f, cache.read(f, a, b)) for a, b in group]) for f in fields}

    carry: dict[str, np.ndarray] | None = None
    for block in _prefetched(load, groups):
        if carry is not None:
            block = {f: np.concatenate([carry[f], block[f]]) for f in fields}
        order = rng.permutation(len(block[fields[0]]))
        n_full = len(order) // batch_size * batch_size
        for i in range(0, n_full, batch_size):
            idx = order[i:i + batch_size]
            yield {f: block[f][idx] for f in fields}
        rest = order[n_full:]
        carry = {f: block[f][rest] for f in fields}


def _tokens(field: str, x: np.ndarray) -> np.ndarray:
    """Per-image arrays -> one row per token: activations [n, P, D] -> [n*P, D]; patch maps [n, h, w] -> [n*h*w]."""
    return x.reshape(-1, x.shape[-1]) if field == "activations" else x.reshape(-1)
