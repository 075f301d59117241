"""One class's patches on one set of images: the target patches (majority label c) and the other labelled ones, and,
per image, how many of each an edit or one of its controls changes; kept per image for the bootstrap."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..settings import SuppressionSettings
from .controls import control_draws
from .edit import LatentEdit
from .logit_shift import LogitShift, RayExit
from .measures import ratio
from .model import SuppressionModel

EFFECT_CACHE_BYTES = 1 << 27  # latent sets' effects kept for their other scales, modes and controls
CHANGED_CACHE = 1 << 24  # changed tokens kept over the settings already evaluated


@dataclass(frozen=True)
class Changed:
    """The tokens whose patch prediction one edit or control changes, their new predictions, and per image how many
    target and other patches changed."""

    tokens_X: torch.Tensor  # int32, ascending within each part the engine found them in
    pred_X: torch.Tensor | None  # uint8; None for a control (only its counts are read)
    target_B: np.ndarray
    other_B: np.ndarray


class ClassPatches:
    """The patch groups of one class, the effects of the latent sets it suppresses (each made once, kept while
    there is room) and the control draws of each latent set (a function of the class, the set and the seed)."""

    def __init__(self, model: SuppressionModel, class_index: int):
        self.model, self.class_index = model, class_index
        labels_N, self.per_image_tokens = model.patch.labels_N, model.grid * model.grid
        target_T = (labels_N == class_index).nonzero().squeeze(1)
        other_T = ((labels_N != 0) & (labels_N != class_index)).nonzero().squeeze(1)
        self.target_B, self.other_B = self._per_image(target_T), self._per_image(other_T)
        self.target_hits = int((model.patch.pred_N[target_T] == class_index).sum())
        self._draws: dict[tuple[int, ...], list] = {}
        self._effects: OrderedDict[tuple[int, ...], LatentEdit] = OrderedDict()
        self._changed: OrderedDict[tuple, Changed] = OrderedDict()
        self._exits: dict[int, RayExit] = {}  # per control seed: the class's random direction is the seed's alone

    def _per_image(self, tokens_T: torch.Tensor) -> np.ndarray:
        return torch.bincount(tokens_T // self.per_image_tokens, minlength=self.model.n_images).numpy()

    @property
    def n_target(self) -> int:
        return int(self.target_B.sum())

    def draws(self, latents: tuple[int, ...], config: SuppressionSettings) -> list:
        if latents not in self._draws:
            self._draws[latents] = control_draws(self.model.frequency_S, self.model.W_dec_SD.shape[1],
                                                 self.class_index, latents, config)
        return self._draws[latents]

    def effect(self, latents: tuple[int, ...]) -> LatentEdit:
        """The latent set's effect, from the cache where it was made before (least recently used ones dropped)."""
        latents = tuple(latents)
        if latents in self._effects:
            self._effects.move_to_end(latents)
            return self._effects[latents]
        effect = self._effects[latents] = self.model.effect(latents)
        size = sum(e.size_bytes for e in self._effects.values())
        while len(self._effects) > 1 and size > EFFECT_CACHE_BYTES:
            _, dropped = self._effects.popitem(last=False)
            size -= dropped.size_bytes
        return effect

    def edit(self, latents: tuple[int, ...], mode: str, scale: float) -> tuple[LatentEdit, Changed]:
        """The effect of a latent set, and what its edit at (mode, scale) changes (kept: the sweep, the tuning's
        checks and the validation measures meet the same settings)."""
        effect, key = self.effect(latents), (tuple(latents), mode, float(scale))
        if key not in self._changed:
            self._changed[key] = self.changed(effect.shift(scale, mode))
            while len(self._changed) > 1 and sum(len(c.tokens_X) for c in self._changed.values()) > CHANGED_CACHE:
                self._changed.popitem(last=False)
        return effect, self._changed[key]

    def changed(self, shift: LogitShift) -> Changed:
        return self.counted(*self.model.patch.moved(shift))

    def counted(self, tokens_X: torch.Tensor, pred_X: torch.Tensor | None) -> Changed:
        """The changed tokens with their per-image target and other counts."""
        labels_X = self.model.patch.labels_N.index_select(0, tokens_X)
        target = labels_X == self.class_index
        # Kept compact (5 bytes a token, not 16): many settings' changes stay cached.
        return Changed(tokens_X.int(), None if pred_X is None else pred_X.to(torch.uint8),
                       self._per_image(tokens_X[target]), self._per_image(tokens_X[(labels_X != 0) & ~target]))

    def controls(self, effect: LatentEdit, draws: list, scale: float,
                 mode: str) -> tuple[list[Changed], list[Changed]]:
        """Per seed, what the random latents (matched in frequency) change, and what a random unit direction given
        the edit's own norm on every token changes (under the shortcut, from the direction's `RayExit`: the seed's
        direction is the same at every setting of the class)."""
        latent_shifts, direction_shifts = effect.control_shifts(
            self.model, [self.effect(latents) for latents, _ in draws], [d for _, d in draws], scale, mode)
        latents = [self.changed(s) for s in latent_shifts]
        if self.model.propagation is not None:
            return latents, [self.changed(s) for s in direction_shifts]
        t_N = effect.direction_lengths(self.model.n_tokens, scale, mode)
        directions = []
        for seed, ((_, direction_D), shift) in enumerate(zip(draws, direction_shifts)):
            if seed not in self._exits:
                self._exits[seed] = RayExit.build(self.model.patch, self.model.probe_W_CD @ direction_D)
            directions.append(self.counted(self._exits[seed].changed(self.model.patch, t_N, shift).nonzero()
                                           .squeeze(1), None))
        return latents, directions

    def predictions(self, changed: Changed) -> torch.Tensor:
        """Every token's patch prediction after the edit."""
        pred_N = self.model.patch.pred_N.clone()
        pred_N[changed.tokens_X.long()] = changed.pred_X.long()
        return pred_N

    def target_rate(self, changed: Changed) -> float:
        return ratio(changed.target_B.sum(), self.target_B.sum())

    def other_rate(self, changed: Changed) -> float:
        return ratio(changed.other_B.sum(), self.other_B.sum())

    def target_accuracy(self, changed: Changed) -> float:
        """The share of target patches predicted as the class."""
        c, patch = self.class_index, self.model.patch
        tokens_X = changed.tokens_X.long()
        target = patch.labels_N[tokens_X] == c
        gained = int((changed.pred_X[target] == c).sum()) - int((patch.pred_N[tokens_X[target]] == c).sum())
        return ratio(self.target_hits + gained, self.n_target)
