"""Every environment variable the pipeline reads, read once, when the definitions load (docs/configuration.md).

Nothing else in the package calls `os.environ`: resources, partitions and sensors take their values from `ENV`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .core.store.checkpoint_watch import QUIET_PERIOD_S


@dataclass(frozen=True)
class Environment:
    data_dir: str = "data"  # SAESEG_DATA: root of every output
    ade20k_root: str = ""  # SAESEG_ADE20K_ROOT: the dataset; empty, the embedded default
    backbone: str = "embedded"  # SAESEG_BACKBONE
    device: str = "cpu"  # SAESEG_DEVICE: where every torch step runs
    sae_checkpoint: str = ""  # SAESEG_SAE_CHECKPOINT: an SAE to import instead of training
    probe_checkpoint: str = ""  # SAESEG_PROBE_CHECKPOINT: a probe to import instead of training
    sensor_interval_s: int = 30  # SAESEG_SENSOR_INTERVAL_S: how often the checkpoint sensors look
    checkpoint_quiet_s: float = QUIET_PERIOD_S  # SAESEG_CHECKPOINT_QUIET_S: how long a checkpoint must stay untouched
    classes_per_run: int | None = None  # SAESEG_CLASSES_PER_RUN: most classes per backfill run; None, all in one
    class_workers: int = 0  # SAESEG_CLASS_WORKERS: processes studying classes side by side; 0, one per core
    executor: str = "in_process"  # SAESEG_EXECUTOR: how a run that does not say executes its steps

    @classmethod
    def read(cls, environ: Mapping[str, str] = os.environ) -> Environment:
        """The values `environ` sets, the defaults for the rest; a malformed value fails naming the variable."""
        default = cls()

        def text(name: str, fallback: str) -> str:
            return environ.get(name, fallback)

        def number(name: str, kind, fallback, least):
            raw = environ.get(name, "").strip()
            if not raw:
                return fallback
            try:
                value = kind(raw)
            except ValueError:
                value = None
            if value is None or value < least:
                raise ValueError(f"{name}={raw!r}: expected a {kind.__name__} of at least {least}")
            return value

        device = text("SAESEG_DEVICE", default.device).strip() or default.device
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"SAESEG_DEVICE={device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
        executor = text("SAESEG_EXECUTOR", default.executor).strip() or default.executor
        if executor not in ("in_process", "multiprocess"):
            raise ValueError(f"SAESEG_EXECUTOR={executor!r}: expected 'in_process' or 'multiprocess'")
        return cls(data_dir=text("SAESEG_DATA", default.data_dir), ade20k_root=text("SAESEG_ADE20K_ROOT", ""),
                   backbone=text("SAESEG_BACKBONE", default.backbone), device=device,
                   sae_checkpoint=text("SAESEG_SAE_CHECKPOINT", ""),
                   probe_checkpoint=text("SAESEG_PROBE_CHECKPOINT", ""),
                   sensor_interval_s=number("SAESEG_SENSOR_INTERVAL_S", int, default.sensor_interval_s, 1),
                   checkpoint_quiet_s=number("SAESEG_CHECKPOINT_QUIET_S", float, default.checkpoint_quiet_s, 0.0),
                   classes_per_run=number("SAESEG_CLASSES_PER_RUN", int, None, 1),
                   class_workers=number("SAESEG_CLASS_WORKERS", int, 0, 0), executor=executor)


ENV = Environment.read()
