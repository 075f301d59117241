"""Shared test fixtures: tiny data made per test, and the path of the real ADE20K sample."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = REPO.parent / "shared" / "ade20k_sample"


@pytest.fixture
def ade20k_sample() -> Path:
    if not (SHARED_SAMPLE / "ADEChallengeData2016").is_dir():
        pytest.skip(f"the real ADE20K sample is not beside the repository ({SHARED_SAMPLE})")
    return SHARED_SAMPLE


def write_tiny_ade20k(root: Path, n_train: int = 6, n_val: int = 3, size: tuple[int, int] = (40, 32),
                      seed: int = 0) -> Path:
    """A tiny dataset in the ADEChallengeData2016 layout: noise images, masks of two or three labels in bands."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    for split, prefix, n in (("training", "ADE_train", n_train), ("validation", "ADE_val", n_val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            w, h = size
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[:, : w // 2] = 1 + i % 3
            mask[:, w // 2:] = 10
            Image.fromarray(image).save(base / "images" / split / f"{prefix}_{i:08d}.jpg", quality=90)
            Image.fromarray(mask, mode="L").save(base / "annotations" / split / f"{prefix}_{i:08d}.png")
    return base


def write_tiny_dinov2(folder: Path, hidden: int = 32, layers: int = 2, image_size: int = 28, seed: int = 0) -> Path:
    """A randomly initialized Dinov2Model saved as a Hugging Face folder: a fast stand-in backbone for tests."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                       intermediate_size=2 * hidden, patch_size=14, image_size=image_size)
    transformers.Dinov2Model(config).save_pretrained(folder)
    return folder


@pytest.fixture
def one_torch_thread():
    """Torch on one thread: small tensors run faster so, and timings of parallel tests do not fight."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_ade20k(tmp_path) -> Path:
    return write_tiny_ade20k(tmp_path / "ade")


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    return write_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2"))


def asset_metadata(result, key: str, partition: str | None = None) -> dict:
    """The metadata values recorded for one asset (and partition) by a `dagster.materialize` result."""
    for event in result.get_asset_materialization_events():
        m = event.event_specific_data.materialization
        if m.asset_key.to_user_string() == key and m.partition == partition:
            return {k: v.value for k, v in m.metadata.items()}
    raise KeyError(f"no materialization of {key} {partition or ''}")


def record_artifact(instance, storage, spec, write, part: str | None = None) -> str:
    """Writes an artifact into the store through `write(folder)` and records its materialization in `instance`, as
    if its asset had run: how a test puts inputs in place for one asset."""
    import dagster as dg

    with storage.store.write(spec, part=part) as folder:
        write(folder)
    instance.report_runless_asset_event(dg.AssetMaterialization(spec.asset, partition=part,
                                                                metadata={"key": spec.key}))
    return spec.key


def record_synthetic_cache(instance, storage, asset: str, **cache_options) -> str:
    """A synthetic activation cache (core.synthetic) as the latest `train_activations` or `val_activations`."""
    from saeseg_assets.core.data.cache import CACHE_FOLDER
    from saeseg_assets.core.data.synthetic import write_sparse_cache
    from saeseg_assets.core.store.artifacts import OutputSpec

    spec = OutputSpec(asset, 1, {"synthetic": cache_options})
    return record_artifact(instance, storage, spec, lambda folder: write_sparse_cache(folder / CACHE_FOLDER,
                                                                                     **cache_options))
