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


@pytest.fixture(autouse=True)
def _no_leftover_dagster_instance():
    """A test that opened a Dagster instance may leave it set as the process's definitions-state store after the
    instance is gone; later `dagster.materialize` calls would then fail to resolve it."""
    from dagster._core.storage.defs_state.base import _current_storage

    _current_storage.set(None)
    yield
