"""Probe sweep training with all heads sharing each batch against the same heads trained one by one, same data,
same run; the held-out selection (per-head pixel evaluation) is timed the same two ways.

Rounds alternate and the fastest of each is kept, because the cores may be shared. The speed-up approaches the
number of heads when reading a batch costs much more than one head's arithmetic (a GPU); on a CPU the heads'
matmuls are a large share of the work and bound it lower. The cache reads show the sharing itself.
Usage: python benchmarks/probe_sweep.py [--cache PATH] [--images 240] [--epochs 2] [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sae_training import (
    matmul_rate,  # the benchmark beside this one (scripts run from benchmarks/)
)

from saeseg_assets.core.data.ade20k import patch_labels
from saeseg_assets.core.data.cache import (
    ActivationCache,
    CacheProvenance,
    CacheWriter,
    token_batches,
)
from saeseg_assets.core.probe.evaluation import evaluate_heads
from saeseg_assets.core.probe.sweep import split_held_out, target_field, train_heads
from saeseg_assets.core.settings import SweepSettings


def synthetic_cache(path: Path, n_images: int, d_model: int = 384, crop: int = 224, patch: int = 14,
                    chunk: int = 16, seed: int = 0) -> ActivationCache:
    """The embedded default's shape (ViT-S/14 at 224 px): images of 2-5 vertical bands of random classes, each
    patch's activation its majority class's embedding plus noise, stored as float16."""
    rng = np.random.default_rng(seed)
    settings = CacheProvenance(backbone="synthetic", backbone_source="synthetic", layer=0, crop_size=crop,
                             patch_size=patch, d_model=d_model, dataset_root="/synthetic", split="training",
                             preprocessing="none")
    embed_CD = rng.normal(size=(151, d_model)).astype(np.float32)
    classes = rng.choice(np.arange(1, 151), 20, replace=False)
    writer = CacheWriter(path, settings, [f"img{i}" for i in range(n_images)], chunk_images=chunk)
    grid = crop // patch
    for start in range(0, n_images, chunk):
        n = min(chunk, n_images - start)
        pixels_NHW = np.zeros((n, crop, crop), dtype=np.uint8)
        for i in range(n):
            edges = np.sort(rng.choice(np.arange(1, crop), rng.integers(1, 5), replace=False))
            for band, (a, b) in enumerate(zip([0, *edges], [*edges, crop])):
                pixels_NHW[i, :, a:b] = rng.choice(classes)
        labels_Nhw, purity_Nhw = patch_labels(pixels_NHW, patch)
        acts_NPD = embed_CD[labels_Nhw.reshape(n, -1)] + 2.0 * rng.normal(size=(n, grid * grid, d_model))
        writer.write_chunk(start, acts_NPD.astype(np.float32), labels_Nhw, purity_Nhw, pixels_NHW)
    return ActivationCache(writer.finish())


def _counting(cache: ActivationCache) -> list[int]:
    reads = [0]
    read = ActivationCache.read

    def counted(*args):
        reads[0] += 1
        return read(cache, *args)

    cache.read = counted  # type: ignore[method-assign]
    return reads


def timed(work) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", help="an existing training cache; default: a synthetic one in a temp folder")
    parser.add_argument("--images", type=int, default=240, help="images of the synthetic cache")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        cache = (ActivationCache(Path(args.cache)) if args.cache
                 else synthetic_cache(Path(tmp) / "synthetic.zarr", args.images))
        shared = SweepSettings(epochs=args.epochs)
        singles = [shared.model_copy(update={"lrs": (lr,), "weight_decays": (wd,)}) for lr, wd in shared.grid]
        train_spans, held_spans = split_held_out(cache, shared.held_out_fraction, shared.seed)
        print(f"cache {cache.path.name}: {cache.n_images} images x {cache.n_patches} patches x {cache.d_model} dims; "
              f"{len(singles)} heads, {args.epochs} epochs on {sum(b - a for a, b in train_spans)} images, "
              f"batch {shared.batch_size}, {args.device} ({torch.get_num_threads()} threads)")
        reads = _counting(cache)
        quiet = lambda m: None  # noqa: E731
        label_field, to_targets = target_field(shared, cache.grid)
        read_pass = timed(lambda: sum(1 for _ in token_batches(
            cache, train_spans, shared.batch_size, np.random.default_rng(0), buffer_images=shared.buffer_images,
            fields=("activations", label_field), per_token={label_field: to_targets}, remainder="yield")))
        times: dict[str, list[float]] = {"train shared": [], "train one by one": []}
        counts: dict[str, int] = {}
        heads: list = []
        for _ in range(args.rounds):
            for name, work in (
                ("train shared", lambda: heads.append(train_heads(cache, train_spans, shared, args.device, quiet))),
                ("train one by one", lambda: [train_heads(cache, train_spans, c, args.device, quiet) for c in singles]),
            ):
                reads[0] = 0
                times[name].append(timed(work))
                counts[name] = reads[0]
        # Selection upsamples every head's logits to pixels: per-head work that sharing reads cannot remove.
        # One held-out chunk and one round keep it short.
        W_HCD, b_HC, _ = heads[-1]
        for name, work in (
            ("select shared", lambda: evaluate_heads(cache, W_HCD, b_HC, held_spans[:1])),
            ("select one by one", lambda: [evaluate_heads(cache, W_HCD[h:h + 1], b_HC[h:h + 1], held_spans[:1])
                                           for h in range(len(singles))]),
        ):
            reads[0] = 0
            times[name] = [timed(work)]
            counts[name] = reads[0]
        print(f"one pass of reading and target building, no heads: {read_pass:.2f} s")
        for name, seconds in times.items():
            print(f"{name:18s} {min(seconds):7.1f} s  {counts[name]:5d} cache reads  "
                  f"(rounds: {', '.join(f'{s:.1f}' for s in seconds)})")
        # The most sharing can give here: heads whose two matmuls per batch (logits, weight gradient) ran at this
        # machine's matmul rate and cost nothing else, against this measured pass of reading and target building.
        n_batches = -(-sum(b - a for a, b in train_spans) * cache.n_patches // shared.batch_size)
        head_s = n_batches * 2 * 2 * shared.batch_size * cache.d_model * 151 / matmul_rate(shared.batch_size,
                                                                                          cache.d_model, 151, args.device)
        H = len(singles)
        ceiling = H * (read_pass + head_s) / (read_pass + H * head_s)
        print(f"ceiling of the training speed-up at the matmul roofline: {ceiling:.1f}x (one pass of reading "
              f"{read_pass:.2f} s, one head's matmuls {head_s:.3f} s per pass)")
        for stage in ("train", "select"):
            ratio = min(times[f"{stage} one by one"]) / min(times[f"{stage} shared"])
            print(f"speed-up of sharing batches, {stage}: {ratio:.1f}x with {len(singles)} heads")

if __name__ == "__main__":
    main()
