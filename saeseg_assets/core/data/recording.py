"""Recording a ViT's activations over an ADE20K-format split into an activation cache.

Decoding runs in threads one chunk ahead of the forward pass, so the backbone rarely waits for input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ade20k import Sample, describe_preprocessing, load_sample, patch_labels
from .backbone import Backbone
from .cache import CacheProvenance, CacheWriter


@dataclass(frozen=True)
class RecordingSummary:
    path: Path
    fingerprint: str
    n_images: int
    n_recorded: int  # images computed by this call (fewer than n_images after a resume)
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.n_recorded / self.seconds if self.seconds > 0 else float("nan")


def cache_settings(backbone: Backbone, layer: int, crop_size: int, dataset_root: Path, split: str,
                   dtype: str = "float16", dataset_fingerprint: str = "") -> CacheProvenance:
    info = backbone.info
    if crop_size % info.patch_size:
        raise ValueError(f"crop_size {crop_size} is not a multiple of the backbone's patch size {info.patch_size}")
    return CacheProvenance(backbone=info.name, backbone_source=info.source, layer=backbone.resolve_layer(layer),
                         crop_size=crop_size, patch_size=info.patch_size, d_model=info.d_model,
                         dataset_root=str(dataset_root), split=split,
                         preprocessing=describe_preprocessing(crop_size), dtype=dtype,
                         dataset_fingerprint=dataset_fingerprint, n_prefix_tokens=info.n_prefix_tokens,
                         final_norm=backbone.final_norm_name)


def _gather(futures) -> tuple[np.ndarray, np.ndarray]:
    pairs = [f.result() for f in futures]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def record_split(samples: Sequence[Sample], backbone: Backbone, settings: CacheProvenance, out_path: Path,
                 chunk_images: int = 16, log: Callable[[str], None] = print,
                 log_every_s: float = 10.0) -> RecordingSummary:
    """Records `samples` into the cache at `out_path`, resuming an interrupted recording of the same settings."""
    writer = CacheWriter(out_path, settings, [s.image_id for s in samples], chunk_images=chunk_images)
    first, chunk_images = writer.n_written, writer.chunk_images
    if first:
        log(f"resuming the {settings.split} recording at image {first} of {writer.n_images} "
            f"({chunk_images} images per chunk, as it was begun)")
    starts = list(range(first, writer.n_images, chunk_images))
    t0 = last_log = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        def submit(start: int) -> list:
            return [pool.submit(load_sample, s, settings.crop_size) for s in samples[start:start + chunk_images]]

        pending = submit(starts[0]) if starts else []
        for i, start in enumerate(starts):
            images_BHWC, pixel_labels_BHW = _gather(pending)
            pending = submit(starts[i + 1]) if i + 1 < len(starts) else []
            labels_Bhw, purity_Bhw = patch_labels(pixel_labels_BHW, settings.patch_size)
            tokens = backbone.layer_tokens(backbone.preprocess(images_BHWC), settings.layer)
            writer.write_chunk(start, tokens.patch_BPD.cpu().numpy(), labels_Bhw, purity_Bhw, pixel_labels_BHW,
                               tokens.prefix_BRD.cpu().numpy(), tokens.final_BPD.cpu().numpy())
            now = time.perf_counter()
            if now - last_log >= log_every_s or i + 1 == len(starts):
                done = writer.n_written - first
                log(f"{settings.split}: {writer.n_written}/{writer.n_images} images ({done / (now - t0):.1f} images/s)")
                last_log = now
    seconds = time.perf_counter() - t0
    writer.finish({"seconds": round(seconds, 3)})
    return RecordingSummary(out_path, writer.key, writer.n_images, writer.n_written - first, seconds)
