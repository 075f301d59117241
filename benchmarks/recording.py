"""Recording throughput against the bare backbone forward, measured side by side on the same images.

Recording = decode + preprocess + forward + cache write; the target ratio is >= 0.9 (input work hidden behind the forward).
Usage: python benchmarks/recording.py [--images 96] [--backbone embedded] [--device cpu] [--data data]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saeseg_assets.core.data.ade20k import list_split, load_sample
from saeseg_assets.core.data.backbone import load_backbone
from saeseg_assets.core.data.demo_data import write_demo_dataset
from saeseg_assets.core.data.recording import cache_settings, record_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default="data", help="where the demo dataset and converted backbone live")
    args = parser.parse_args()

    data = Path(args.data).resolve()
    root = write_demo_dataset(data / "demo_ade20k")
    samples = list_split(root, "training")[: args.images]
    backbone = load_backbone(args.backbone, data, args.device)
    settings = cache_settings(backbone, -2, 224, root, "training")
    print(f"{backbone.info.name} on {args.device} ({torch.get_num_threads()} threads), {len(samples)} images")

    batches = [np.stack([load_sample(s, 224)[0] for s in samples[i:i + args.chunk]])
               for i in range(0, len(samples), args.chunk)]
    backbone.layer_tokens(backbone.preprocess(batches[0][:2]), settings.layer)  # warm-up

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def bare_forward() -> float:
        sync()
        t0 = time.perf_counter()
        for images in batches:
            backbone.layer_tokens(backbone.preprocess(images), settings.layer).patch_BPD.cpu()
        sync()
        return time.perf_counter() - t0

    def recording(tmp: Path, i: int) -> float:
        t0 = time.perf_counter()
        record_split(samples, backbone, settings, tmp / f"bench{i}.zarr", chunk_images=args.chunk, log=lambda m: None)
        return time.perf_counter() - t0

    # Alternating rounds, best of each: the two figures see the same machine load.
    with tempfile.TemporaryDirectory() as tmp:
        rounds = [(bare_forward(), recording(Path(tmp), i)) for i in range(args.rounds)]
    forward_s = min(r[0] for r in rounds)
    record_s = min(r[1] for r in rounds)

    n = len(samples)
    print(f"bare forward (pre-decoded images): {n / forward_s:7.2f} images/s")
    print(f"recording (decode+forward+write):  {n / record_s:7.2f} images/s")
    print(f"ratio recording / bare forward:    {forward_s / record_s:.3f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
