"""The suppression experiment's settings: one frozen record whose fields document themselves; free of torch, so the
Dagster config class can take its defaults from here at import time."""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("every_token", "where_active")


@dataclass(frozen=True)
class SuppressionConfig:
    """The configured setting, the controls, the dose-response sweep and the class-specificity thresholds."""

    scale: float = -2.0  # v_i = scale x (max activation of latent i over the training tokens); 0 = ablation
    mode: str = "every_token"  # "every_token": v_i on every token (the original work); "where_active": only on
    # tokens where one of the chosen latents fires
    control_seeds: int = 5  # draws of each control, averaged
    seed: int = 0
    dose_scales: tuple[float, ...] = (-4.0, -2.0, -1.0, -0.5, 0.0)
    dose_modes: tuple[str, ...] = MODES
    frequency_pool: int = 16  # a random-latent control draws among this many latents nearest in firing frequency
    min_target_change: float = 0.5  # class-specific: target change rate at least this,
    other_factor: float = 3.0  # at least this times the other change rate,
    control_factor: float = 2.0  # and at least this times the larger control target change rate

    def __post_init__(self) -> None:
        for mode in (self.mode, *self.dose_modes):
            if mode not in MODES:
                raise ValueError(f"suppression mode {mode!r}: expected one of {MODES}")
        if self.control_seeds < 1:
            raise ValueError(f"control_seeds = {self.control_seeds}: at least one draw per control")
        if not all(math.isfinite(s) for s in (self.scale, *self.dose_scales)):
            raise ValueError("suppression scales must be finite numbers")

    def settings(self) -> list[tuple[str, float]]:
        """(mode, scale) of the dose-response, with the configured setting included."""
        grid = [(m, float(s)) for m in self.dose_modes for s in self.dose_scales]
        return grid if (self.mode, self.scale) in grid else [*grid, (self.mode, float(self.scale))]
