"""Zarr activation caches: a resumable, atomic writer and the one streaming reader.

Layout and attributes are documented in docs/formats.md ("Activation cache").
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr

from ..store.artifacts import OutputSpec, write_atomic

FORMAT_VERSION = 2  # 2: prefix_tokens and final_tokens, what the tail after the layer needs and gives
CACHE_FOLDER = "activations.zarr"  # the cache inside its artifact folder
_PROGRESS_FILE = "progress.json"


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, or made with other settings than asked for."""


@dataclass(frozen=True)
class CacheProvenance:
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
    dataset_fingerprint: str = ""  # of both splits' files (ade20k.dataset_fingerprint), shared by a pair of caches
    # What the backbone's tail needs and gives, recorded from a backbone: the prefix tokens (CLS, registers) at the
    # layer and the final patch tokens, after `final_norm` ("layernorm", or "none (last_hidden_state)" for CLIP).
    # Caches made without a backbone (synthetic ones) have neither: final_norm "".
    n_prefix_tokens: int = 0
    final_norm: str = ""

    @property
    def has_tail_tokens(self) -> bool:
        return bool(self.final_norm)

    @property
    def grid(self) -> int:
        return self.crop_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid


def fingerprint(settings: CacheProvenance, image_ids: Sequence[str]) -> str:
    """A short content key: equal for caches that must hold equal data."""
    return OutputSpec("activations", FORMAT_VERSION, {**asdict(settings), "image_ids": list(image_ids)}).key


class CacheWriter:
    """Writes a cache chunk by chunk into the zarr folder `path`, resumable after a crash; `finish()` marks it complete.

    A chunk is `chunk_images` whole images; progress is recorded only after a chunk is fully written, so a killed run
    resumes at the last complete chunk. `path` lies in a folder the artifact store publishes once the cache is done.
    """

    def __init__(self, path: Path, settings: CacheProvenance, image_ids: Sequence[str], chunk_images: int = 16):
        self.path = Path(path)
        self.settings = settings
        self.image_ids = list(image_ids)
        self.chunk_images = chunk_images
        self.key = fingerprint(settings, self.image_ids)
        self.n_written = self._open_or_resume()

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def _progress(self, n_written: int) -> dict:
        return {"fingerprint": self.key, "chunk_images": self.chunk_images, "n_written": n_written}

    def _open_or_resume(self) -> int:
        progress_file = self.path / _PROGRESS_FILE
        if progress_file.exists():
            progress = json.loads(progress_file.read_text())
            if progress.get("fingerprint") == self.key:
                # Resume in the partial's chunk size, not afresh: its work is kept, and all images are computed in
                # batches of one size, as in an uninterrupted recording (`chunk_images` does not change the key).
                self.chunk_images = int(progress["chunk_images"])
                self._group = zarr.open_group(str(self.path), mode="r+")
                return int(progress["n_written"])
        # A partial cache of other settings is of no use: start afresh.
        shutil.rmtree(self.path, ignore_errors=True)
        self._create()
        write_atomic(progress_file, json.dumps(self._progress(0)).encode())
        return 0

    def _create(self) -> None:
        s, n, c = self.settings, self.n_images, self.chunk_images
        g = zarr.open_group(str(self.path), mode="w")
        # Activations are read far more often than written and barely compress: store them raw.
        g.create_array("activations", shape=(n, s.n_patches, s.d_model), chunks=(c, s.n_patches, s.d_model),
                       dtype=s.dtype, compressors=None)
        if s.has_tail_tokens:
            g.create_array("prefix_tokens", shape=(n, s.n_prefix_tokens, s.d_model),
                           chunks=(c, s.n_prefix_tokens, s.d_model), dtype=s.dtype, compressors=None)
            g.create_array("final_tokens", shape=(n, s.n_patches, s.d_model), chunks=(c, s.n_patches, s.d_model),
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
                    patch_purity_Bhw: np.ndarray, pixel_labels_BHW: np.ndarray, prefix_BRD: np.ndarray | None = None,
                    final_BPD: np.ndarray | None = None) -> None:
        """Writes images [start, start + B): one whole chunk (or the last, shorter one), in order. `prefix_BRD` and
        `final_BPD` are given exactly when the cache records tail tokens."""
        if start != self.n_written or start % self.chunk_images:
            raise ValueError(f"chunks must be written in order: expected start {self.n_written}, got {start}")
        stop = start + len(acts_BPD)
        if stop != min(start + self.chunk_images, self.n_images):
            raise ValueError(f"chunk at {start} holds {len(acts_BPD)} images, expected a whole chunk")
        if (prefix_BRD is not None, final_BPD is not None) != (self.settings.has_tail_tokens,) * 2:
            raise ValueError(f"{self.path}: prefix and final tokens must be written exactly when the cache records "
                             f"them (final_norm {self.settings.final_norm!r})")
        g = self._group
        g["activations"][start:stop] = acts_BPD.astype(self.settings.dtype, copy=False)
        if self.settings.has_tail_tokens:
            g["prefix_tokens"][start:stop] = prefix_BRD.astype(self.settings.dtype, copy=False)
            g["final_tokens"][start:stop] = final_BPD.astype(self.settings.dtype, copy=False)
        g["patch_labels"][start:stop] = patch_labels_Bhw
        g["patch_purity"][start:stop] = patch_purity_Bhw
        g["pixel_labels"][start:stop] = pixel_labels_BHW
        self.n_written = stop
        write_atomic(self.path / _PROGRESS_FILE, json.dumps(self._progress(stop)).encode())

    def finish(self, extra_attrs: dict | None = None) -> Path:
        """Marks the cache complete; returns its path."""
        if self.n_written != self.n_images:
            raise CacheError(f"{self.path}: finish() after {self.n_written} of {self.n_images} images")
        self._group.attrs.update({**(extra_attrs or {}), "complete": True})
        (self.path / _PROGRESS_FILE).unlink()
        return self.path


class ActivationCache:
    """Read access to a complete cache. All reads are block reads of whole images."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise CacheError(f"{self.path}: no activation cache here")
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
    def settings(self) -> CacheProvenance:
        fields = CacheProvenance.__dataclass_fields__
        return CacheProvenance(**{k: self.attrs[k] for k in fields if k in self.attrs})

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

        yield from zip(starts, prefetch(map(load, starts)))


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Runs the iterator `items` in one background thread, `depth` items ahead of the consumer, so that reading (or
    shuffling, or copying) the next items overlaps the consumer's work on this one.

    An error in `items` is re-raised in the consumer. Closing the returned generator (or dropping it) stops the thread
    and closes `items` where it is a generator, so nested streams wind down from the outside in.
    """
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[str, object]) -> bool:
        # A timed put, so that a producer facing a full queue notices when the consumer has gone.
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not offer(("item", item)):
                    return
            offer(("end", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer(("error", exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = out.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        stop.set()
        thread.join()


Span = tuple[int, int]  # images [start, stop) of a cache, within one chunk
REMAINDERS = ("carry", "yield")


def chunk_spans(cache: ActivationCache, images: range | None = None) -> list[Span]:
    """The chunk-aligned spans that cover `images` (default: all) exactly, in order: the units of whole-chunk reads."""
    images = images if images is not None else range(cache.n_images)
    c = cache.chunk_images
    edges = sorted({images.start, images.stop, *range((images.start // c + 1) * c, images.stop, c)})
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def token_batches(cache: ActivationCache, spans: Sequence[Span], batch_size: int, rng: np.random.Generator, *,
                  buffer_images: int = 256, fields: Sequence[str] = ("activations",),
                  per_token: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
                  remainder: str = "carry") -> Iterator[dict[str, np.ndarray]]:
    """One shuffled pass over the tokens of `spans`, as dicts {field: [batch, ...] array}.

    Spans come in a random order, about `buffer_images` images at a time (the memory bound, many images mixed), read in
    a background thread; each fill's tokens are shuffled together and cut into batches. `rng` draws the span order,
    then one permutation per fill; pass one Generator to every epoch to go on with its stream.
    `remainder` decides the tokens after a fill's last whole batch: "carry" mixes them into the next fill and drops
    the pass's last few (every batch is whole), "yield" gives them as a shorter batch (every token seen once).
    Per-image arrays become per-token rows through `per_token[field]` where given (say, pixel labels to targets),
    else by flattening.
    """
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder {remainder!r}: expected one of {REMAINDERS}")
    per_token = per_token or {}
    order = [spans[i] for i in rng.permutation(len(spans))]
    per_fill = max(1, buffer_images // cache.chunk_images)
    fills = [order[i:i + per_fill] for i in range(0, len(order), per_fill)]

    def rows(field: str, a: int, b: int) -> np.ndarray:
        x = cache.read(field, a, b)
        return per_token[field](x) if field in per_token else _tokens(field, x)

    def load(fill: list[Span]) -> dict[str, np.ndarray]:
        return {f: np.concatenate([rows(f, a, b) for a, b in fill]) for f in fields}

    carry: dict[str, np.ndarray] | None = None
    for block in prefetch(map(load, fills)):
        if carry is not None:
            block = {f: np.concatenate([carry[f], block[f]]) for f in fields}
        perm = rng.permutation(len(block[fields[0]]))
        end = len(perm) if remainder == "yield" else len(perm) // batch_size * batch_size
        for i in range(0, end, batch_size):
            idx = perm[i:i + batch_size]
            yield {f: block[f][idx] for f in fields}
        if remainder == "carry":
            carry = {f: block[f][perm[end:]] for f in fields}


TOKEN_FIELDS = ("activations", "final_tokens")  # the arrays of one vector per patch token


def _tokens(field: str, x: np.ndarray) -> np.ndarray:
    """Per-image arrays -> one row per token: token vectors [n, P, D] -> [n*P, D]; patch maps [n, h, w] ->
    [n*h*w]."""
    return x.reshape(-1, x.shape[-1]) if field in TOKEN_FIELDS else x.reshape(-1)


def check_same_dataset(train: ActivationCache, val: ActivationCache) -> None:
    """Refuses to combine a training and a validation cache recorded from different datasets (or from one dataset
    before and after its files changed), naming both."""
    # Caches made without a dataset fingerprint (synthetic ones) are told apart by their dataset root.
    datasets = [c.attrs.get("dataset_fingerprint") or c.attrs.get("dataset_root") for c in (train, val)]
    if datasets[0] != datasets[1]:
        described = (f"{c.path} (dataset {d} under {c.attrs.get('dataset_root')})"
                     for c, d in zip((train, val), datasets))
        raise CacheError(f"{next(described)} and {next(described)} were recorded from different datasets: materialize "
                         "train_activations and val_activations together, so that both come from the dataset as it is "
                         "now")
