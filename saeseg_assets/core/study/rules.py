"""The rules that rank one class's latents from the latent statistics (f1, activation_sum, probe_aware), the chosen
latents, and their record in class_latents.json."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..settings import SelectionSettings
from .latent_stats import LatentStats, dense_mask

FORMAT_VERSION = 1  # of class_latents.json


@dataclass(frozen=True)
class ClassLatents:
    """The chosen latents of one class, best first; empty with a reason when none can be chosen."""

    class_index: int
    rule: str
    latents: tuple[int, ...]
    scores: tuple[float, ...]
    details: tuple[dict, ...]  # per latent: frequency, max/mean activation, counts on class c
    reason: str = ""


def f1_scores(stats: LatentStats, class_index: int) -> np.ndarray:
    """F1 of "code > 0" against "label == c" over pure patches: 2 TP / (fired + positives)."""
    tp_S = stats.pure_fire_count_CS[class_index].astype(np.float64)
    fired_S = stats.pure_fire_count_CS.sum(axis=0).astype(np.float64)
    positives = float(stats.pure_patches_C[class_index])
    denominator_S = fired_S + positives
    return np.divide(2 * tp_S, denominator_S, out=np.zeros_like(tp_S), where=denominator_S > 0)


def activation_sum_scores(stats: LatentStats, class_index: int, dense_frequency: float) -> np.ndarray:
    """Sum of codes over class-c patches; dense latents (`dense_mask` at `dense_frequency`) score -inf."""
    scores_S = stats.class_act_sum_CS[class_index].astype(np.float64).copy()
    scores_S[dense_mask(stats.frequency_S, dense_frequency)] = -np.inf
    return scores_S


def margin_effects(W_dec_SD: np.ndarray, probe_W_CD: np.ndarray, present_C: np.ndarray,
                   class_index: int) -> np.ndarray:
    """What one unit of each latent adds to class c's logit margin: W_dec[i] . (w_c - mean of the other present
    classes' probe rows) [S]; `present_C` marks the classes present (output 0 never counts)."""
    others_C = np.asarray(present_C, dtype=bool).copy()
    others_C[[0, class_index]] = False
    rival_D = probe_W_CD[others_C].mean(0) if others_C.any() else np.zeros(probe_W_CD.shape[1])
    return np.asarray(W_dec_SD, dtype=np.float64) @ (probe_W_CD[class_index] - rival_D).astype(np.float64)


def probe_aware_scores(stats: LatentStats, class_index: int, margin_effect_S: np.ndarray) -> np.ndarray:
    """Mean code over class-c patches (0 where it does not fire) times the latent's effect on c's logit margin: how
    much of the probe's case for class c the latent carries there."""
    mean_on_class_S = stats.class_act_sum_CS[class_index] / max(int(stats.class_patches_C[class_index]), 1)
    return mean_on_class_S * margin_effect_S


def latent_scores(stats: LatentStats, class_index: int, rule: str, dense_frequency: float,
                  margin_effect_S: np.ndarray | None = None) -> np.ndarray:
    if rule == "f1":
        return f1_scores(stats, class_index)
    if rule == "activation_sum":
        return activation_sum_scores(stats, class_index, dense_frequency)
    if margin_effect_S is None:
        raise ValueError("the probe_aware rule needs the latents' effects on the class's logit margin")
    return probe_aware_scores(stats, class_index, margin_effect_S)


def select_class_latents(stats: LatentStats, class_index: int, config: SelectionSettings = SelectionSettings(),
                         rule: str | None = None, k: int | None = None,
                         margin_effect_S: np.ndarray | None = None) -> ClassLatents:
    """The top k latents (default: the config's rule and k); only latents with a positive score (they fire on class
    c, and for probe_aware push its logit margin up)."""
    rule, k = rule or config.rule, k or config.k
    name = f"class {class_index}"
    if stats.class_patches_C[class_index] == 0:
        return ClassLatents(class_index, rule, (), (), (),
                            f"{name} is absent from the training cache: no patch has it as majority label")
    if rule == "f1" and stats.pure_patches_C[class_index] == 0:
        return ClassLatents(class_index, rule, (), (), (),
                            f"{name} has no pure training patch (purity >= {stats.meta.get('purity', 0.9)}), "
                            "which the f1 rule scores on")
    scores_S = latent_scores(stats, class_index, rule, config.dense_frequency, margin_effect_S)
    # Stable descending order: equal scores keep the lower latent id first.
    order = np.argsort(-scores_S, kind="stable")
    chosen = [int(i) for i in order[:k] if np.isfinite(scores_S[i]) and scores_S[i] > 0]
    if not chosen:
        return ClassLatents(class_index, rule, (), (), (), f"no latent scores above 0 for {name} under rule {rule!r}")
    f1_S = f1_scores(stats, class_index)
    details = tuple(_latent_detail(stats, class_index, i, f1_S[i]) for i in chosen)
    return ClassLatents(class_index, rule, tuple(chosen), tuple(float(scores_S[i]) for i in chosen), details)


def _latent_detail(stats: LatentStats, c: int, i: int, f1: float) -> dict:
    fires = int(stats.fire_count_S[i])
    on_class = int(stats.class_fire_count_CS[c, i])
    return {"latent": i, "frequency": float(stats.frequency_S[i]), "max_activation": float(stats.act_max_S[i]),
            "mean_activation": float(stats.mean_active_S[i]), "fires_on_class": on_class,
            "class_activation_sum": float(stats.class_act_sum_CS[c, i]),
            "precision": on_class / fires if fires else math.nan,
            "recall": on_class / int(stats.class_patches_C[c]) if stats.class_patches_C[c] else math.nan,
            "pure_f1": float(f1)}


def class_latents_record(chosen: ClassLatents, class_key: str, class_name: str, config: SelectionSettings,
                         stats_meta: dict, rankings: dict[str, ClassLatents] | None = None) -> dict:
    """The JSON of a class's `class_latents.json`: the chosen latents with their scores and statistics, and every
    rule's ranking (`config.ranked` deep) for the latent-count sweep."""
    return {"class_key": class_key, "class_index": chosen.class_index, "class_name": class_name,
            "status": "chosen" if chosen.latents else "empty", "reason": chosen.reason, "rule": chosen.rule,
            "k": config.k, "dense_frequency": config.dense_frequency, "latents": list(chosen.latents),
            "scores": list(chosen.scores), "details": list(chosen.details),
            "purity": stats_meta.get("purity"),
            "rankings": {rule: {"latents": list(r.latents), "scores": list(r.scores), "reason": r.reason}
                         for rule, r in (rankings or {}).items()}}
