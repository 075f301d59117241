"""One class's patches on one set of images: the target patches (majority label c) and the other labelled ones, and,
per image, how many of each an edit or one of its controls changes; kept per image for the bootstrap."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..settings import SuppressionSettings
from .controls import control_draws
from .edit import Edit, direction_shift, edit_shift, latent_edit
from .measures import ratio
from .model import SuppressionModel


@dataclass(frozen=True)
class Changed:
    """The patch predictions after one edit or control, and per image how many target and other patches changed."""

    pred_N: torch.Tensor
    target_B: np.ndarray
    other_B: np.ndarray


class ClassPatches:
    """The patch groups of one class, the image of each token, and the control draws of each latent set (a function
    of the class, the set and the seed: made once)."""

    def __init__(self, model: SuppressionModel, class_index: int):
        self.model, self.class_index = model, class_index
        labels_N = model.patch.labels_N
        self.image_N = torch.arange(len(labels_N)) // (model.grid * model.grid)
        self.target_N = labels_N == class_index
        self.other_N = (labels_N != 0) & ~self.target_N
        self.target_B, self.other_B = self._per_image(self.target_N), self._per_image(self.other_N)
        self._draws: dict[tuple[int, ...], list] = {}

    def _per_image(self, mask_N: torch.Tensor) -> np.ndarray:
        return torch.bincount(self.image_N[mask_N], minlength=self.model.n_images).numpy()

    @property
    def n_target(self) -> int:
        return int(self.target_B.sum())

    def draws(self, latents: tuple[int, ...], config: SuppressionSettings) -> list:
        if latents not in self._draws:
            self._draws[latents] = control_draws(self.model.frequency_S, self.model.W_dec_SD.shape[1],
                                                 self.class_index, latents, config)
        return self._draws[latents]

    def edit(self, latents: tuple[int, ...], mode: str, scale: float, columns=None) -> tuple[Edit, Changed]:
        """The edit of a latent set, and what it changes."""
        edit = latent_edit(self.model, latents, scale, mode, columns)
        return edit, self.changed(self.model.patch.predictions_after(edit_shift(self.model, edit)))

    def changed(self, pred_N: torch.Tensor) -> Changed:
        moved_N = pred_N != self.model.patch.pred_N
        return Changed(pred_N, self._per_image(moved_N & self.target_N), self._per_image(moved_N & self.other_N))

    def controls(self, edit: Edit, draws: list, scale: float, mode: str) -> tuple[list[Changed], list[Changed]]:
        """Per seed, what the random latents (matched in frequency) change, and what a random unit direction given
        the edit's own norm on every token changes."""
        random_latents, random_direction = [], []
        for latents, direction_D in draws:
            shift = edit_shift(self.model, latent_edit(self.model, latents, scale, mode))
            random_latents.append(self.changed(self.model.patch.predictions_after(shift)))
            shift = direction_shift(self.model, edit, direction_D)
            random_direction.append(self.changed(self.model.patch.predictions_after(shift)))
        return random_latents, random_direction

    def target_rate(self, changed: Changed) -> float:
        return ratio(changed.target_B.sum(), self.target_B.sum())

    def other_rate(self, changed: Changed) -> float:
        return ratio(changed.other_B.sum(), self.other_B.sum())

    def target_accuracy(self, pred_N: torch.Tensor) -> float:
        """The share of target patches predicted as the class."""
        return ratio(int((pred_N[self.target_N] == self.class_index).sum()), self.n_target)
