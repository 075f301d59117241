"""The effect rule: a class's latents chosen by what suppressing them does on the held-out training images (target
minus other change rate), added one by one from the other rules' top candidates while each still helps."""

from __future__ import annotations

import math

from ..report.results import EffectChoice
from ..settings import SuppressionSettings
from .patches import ClassPatches


def candidate_pool(rankings: dict[str, tuple[int, ...]], size: int) -> list[int]:
    """Up to `size` latents taken from the rankings in turn (each rule's best first, then each one's second, ...),
    each once: the rules' candidates, none favoured."""
    pool: list[int] = []
    for depth in range(max((len(r) for r in rankings.values()), default=0)):
        for ranking in rankings.values():
            if depth < len(ranking) and ranking[depth] not in pool and len(pool) < size:
                pool.append(int(ranking[depth]))
    return pool


def effect_score(patches: ClassPatches, latents: tuple[int, ...], config: SuppressionSettings) -> float:
    """The best target minus other change rate that suppressing `latents` reaches over the sweep's modes and
    non-zero scales (-inf where no setting defines both rates)."""
    best = -math.inf
    for mode, scale in config.dose_grid():
        if scale != 0:
            _, changed = patches.edit(latents, mode, scale)
            value = patches.target_rate(changed) - patches.other_rate(changed)
            best = max(best, value) if math.isfinite(value) else best
    return best


def effect_ranking(patches: ClassPatches, rankings: dict[str, tuple[int, ...]],
                   config: SuppressionSettings) -> EffectChoice:
    """The effect rule on `patches` (the tuning images): every candidate of `candidate_pool` scored alone
    (`effect_score`); then, from the `effect_greedy` best of them, the latent that raises the set's score most is
    added while it raises it by at least `effect_margin` (the first always), up to the sweep's largest N. The ranking
    is the set in the order added, then the other candidates by their own score."""
    pool = candidate_pool(rankings, config.effect_pool)
    own = {i: effect_score(patches, (i,), config) for i in pool}
    order = sorted(pool, key=lambda i: (-own[i], i))
    chosen: list[int] = []
    gains: list[float] = []
    while len(chosen) < min(max(config.n_latents), config.effect_greedy):
        scored = [(effect_score(patches, (*chosen, i), config), i) for i in order[:config.effect_greedy]
                  if i not in chosen]
        if not scored:
            break
        value, latent = max(scored, key=lambda vi: (vi[0], -vi[1]))
        if chosen and not value >= gains[-1] + config.effect_margin:
            break
        chosen.append(latent)
        gains.append(value)
    return EffectChoice(tuple(chosen) + tuple(i for i in order if i not in chosen), len(chosen), tuple(gains),
                        len(pool))
