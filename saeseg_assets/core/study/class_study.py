"""The per-class suppression study: a sweep over ranking rule x number of latents x mode x scale, a setting tuned on
held-out training images only, and the configured and tuned settings measured once on validation, with controls,
95% bootstrap intervals over validation images, and the TPP score."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..probe.metrics import N_OUTPUTS, ConfusionMatrix
from ..settings import SuppressionConfig
from .logit_shift import ImageCounts
from .suppression import (
    SuppressionModel,
    control_draws,
    direction_shift,
    edit_shift,
    is_class_specific,
    latent_edit,
    most_moved,
    pixel_measures,
    single_thread,
)

CONTROLS = ("random_latents", "random_direction")


@dataclass(frozen=True)
class Setting:
    """One way of suppressing a class: the top `n_latents` of a rule's ranking, set to `scale` x max, in `mode`."""

    rule: str
    n_latents: int
    mode: str
    scale: float


# ---------------------------------------------------------------------------------------------------------------
# Patch-level measures, kept per image for the bootstrap


class ClassPatches:
    """One class's patch groups on one set of images: tokens of majority label c (target) and of any other label
    but 0 (other), and the image of each token."""

    def __init__(self, model: SuppressionModel, class_index: int):
        self.model, self.class_index = model, class_index
        labels_N = model.patch.labels_N
        self.image_N = torch.arange(len(labels_N)) // (model.grid * model.grid)
        self.target_N = labels_N == class_index
        self.other_N = (labels_N != 0) & ~self.target_N
        self.target_B, self.other_B = self._per_image(self.target_N), self._per_image(self.other_N)
        self._draws: dict[tuple[int, ...], list] = {}

    def draws(self, latents: tuple[int, ...], config: SuppressionConfig) -> list:
        """The control draws of a latent set (a function of the class, the set and the seed): made once."""
        if latents not in self._draws:
            self._draws[latents] = control_draws(self.model, self.class_index, latents, config)
        return self._draws[latents]

    def _per_image(self, mask_N: torch.Tensor) -> np.ndarray:
        return torch.bincount(self.image_N[mask_N], minlength=self.model.n_images).numpy()

    @property
    def n_target(self) -> int:
        return int(self.target_B.sum())

    def changed(self, setting_latents: tuple[int, ...], mode: str, scale: float, columns=None) -> dict:
        """The edit's predictions, and per image how many target and other patches changed prediction."""
        edit = latent_edit(self.model, setting_latents, scale, mode, columns)
        return self._counts(self.model.patch.predictions_after(edit_shift(self.model, edit)), edit=edit)

    def _counts(self, pred_N: torch.Tensor, **extra) -> dict:
        moved_N = pred_N != self.model.patch.pred_N
        return {"pred_N": pred_N, "target_B": self._per_image(moved_N & self.target_N),
                "other_B": self._per_image(moved_N & self.other_N), **extra}

    def controls(self, edit, draws: list, scale: float, mode: str) -> dict[str, list[dict]]:
        """Per control and seed, the same counts: random latents matched in frequency, a random unit direction
        given the edit's own norm on every token."""
        out = {"random_latents": [], "random_direction": []}
        for random_latents, direction_D in draws:
            shift = edit_shift(self.model, latent_edit(self.model, random_latents, scale, mode))
            out["random_latents"].append(self._counts(self.model.patch.predictions_after(shift)))
            shift = direction_shift(self.model, edit, direction_D)
            out["random_direction"].append(self._counts(self.model.patch.predictions_after(shift)))
        return out

    def rates(self, counts: dict) -> dict[str, float]:
        return {"target_change_rate": _ratio(counts["target_B"].sum(), self.target_B.sum()),
                "other_change_rate": _ratio(counts["other_B"].sum(), self.other_B.sum())}


def _ratio(num, den) -> float:
    return float(num) / float(den) if den else math.nan


def patch_accuracies(labels_N: torch.Tensor, pred_N: torch.Tensor) -> np.ndarray:
    """Per class, the share of its patches predicted as it (NaN for classes without patches): [151]."""
    total = torch.bincount(labels_N, minlength=N_OUTPUTS).double()
    correct = torch.bincount(labels_N[pred_N == labels_N], minlength=N_OUTPUTS).double()
    return torch.where(total > 0, correct / total.clamp(min=1), torch.nan).numpy()


def tpp_score(labels_N: torch.Tensor, pred_before_N: torch.Tensor, pred_after_N: torch.Tensor,
              class_index: int) -> float:
    """SAEBench's targeted probe perturbation per patch: the drop of class c's patch accuracy minus the mean drop of
    the other present classes' patch accuracy (label 0 never counts)."""
    drop_C = patch_accuracies(labels_N, pred_before_N) - patch_accuracies(labels_N, pred_after_N)
    others = [k for k in range(1, N_OUTPUTS) if k != class_index and not math.isnan(drop_C[k])]
    if math.isnan(drop_C[class_index]):
        return math.nan
    return float(drop_C[class_index] - (np.mean(drop_C[others]) if others else 0.0))


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap over images


def bootstrap_weights(n_images: int, resamples: int, seed) -> np.ndarray:
    """How often each image is drawn in each resample (with replacement): [resamples, n_images]."""
    draws = np.random.default_rng(seed).integers(0, n_images, (resamples, n_images))
    flat = (draws + np.arange(resamples)[:, None] * n_images).ravel()
    return np.bincount(flat, minlength=resamples * n_images).reshape(resamples, n_images)


def interval(values_R: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of resampled statistics (resamples where it is undefined left out)."""
    values_R = values_R[np.isfinite(values_R)]
    if not len(values_R):
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values_R, tail)), float(np.percentile(values_R, 100 - tail))


def ratio_interval(weights_RB: np.ndarray, num_B: np.ndarray, den_B: np.ndarray) -> tuple[float, float]:
    """95% interval of sum(num) / sum(den) over resamples of the images."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return interval((weights_RB @ num_B) / (weights_RB @ den_B))


def iou_change_interval(weights_RB: np.ndarray, before: ImageCounts, after: ImageCounts) -> tuple[float, float]:
    """95% interval of the class's IoU after minus before, both computed on each resample of the images."""
    def iou(counts: ImageCounts) -> np.ndarray:
        tp, pred, gt = (weights_RB @ x.numpy().astype(np.float64) for x in (counts.tp_B, counts.pred_B, before.gt_B))
        return tp / (gt + pred - tp)

    with np.errstate(invalid="ignore", divide="ignore"):
        return interval(iou(after) - iou(before))


# ---------------------------------------------------------------------------------------------------------------
# Tuning on held-out training images


def candidate_settings(rankings: dict[str, tuple[int, ...]], rules, config: SuppressionConfig) -> list[Setting]:
    """Every (rule, N, mode, scale) of the sweep; N beyond a ranking's length is the whole ranking, counted once."""
    out = []
    for rule in rules:
        ranking = rankings.get(rule) or ()
        for n in sorted({min(n, len(ranking)) for n in config.n_latents} - {0}):
            out += [Setting(rule, n, mode, scale) for mode, scale in config.settings()]
    return out


def sweep_row(patches: ClassPatches, setting: Setting, latents: tuple[int, ...], config: SuppressionConfig,
              with_controls: bool, columns=None) -> dict:
    """Patch-level figures of one setting; with controls, each control's mean and per-seed largest target change
    rate and the class-specificity verdict (against the largest single draw)."""
    counts = patches.changed(latents, setting.mode, setting.scale, columns)
    row = {**asdict(setting), "active_tokens": len(counts["edit"].tokens_U), **patches.rates(counts),
           "target_patch_accuracy": _ratio(
               int((counts["pred_N"][patches.target_N] == patches.class_index).sum()), patches.n_target)}
    if with_controls:
        controls = patches.controls(counts["edit"], patches.draws(latents, config), setting.scale, setting.mode)
        for name, per_seed in controls.items():
            seed_rates = [patches.rates(c) for c in per_seed]
            row[f"{name}_target_change_rate"] = float(np.mean([r["target_change_rate"] for r in seed_rates]))
            row[f"{name}_other_change_rate"] = float(np.mean([r["other_change_rate"] for r in seed_rates]))
            row[f"{name}_target_change_max"] = float(max(r["target_change_rate"] for r in seed_rates))
        row["specific"] = is_class_specific(row["target_change_rate"], row["other_change_rate"],
                                            [row[f"{n}_target_change_max"] for n in CONTROLS], config)
    return row


def _preference(row: dict, config: SuppressionConfig) -> tuple:
    """Specific with few other patches changed first, then specific, then the widest margin of the target change
    over the other patches and the controls."""
    values = [row["target_change_rate"], row["other_change_rate"],
              *(row.get(f"{n}_target_change_max", 0.0) for n in CONTROLS)]
    if any(not math.isfinite(v) for v in values):
        return (False, False, -math.inf)
    specific = bool(row.get("specific", False))
    margin = values[0] - max(values[1:])
    return (specific and values[1] <= config.max_other_change, specific, margin)


def tune(model: SuppressionModel, class_index: int, rankings: dict[str, tuple[int, ...]],
         config: SuppressionConfig) -> dict:
    """The setting chosen for one class on the held-out training images in `model` (never validation): every
    candidate's target and other change rates; the best `tuning_candidates` per rule (other change rate within
    `max_other_change` first, then the margin of target over other) also get their controls; the preferred of those
    wins, overall and per rule."""
    with single_thread():
        patches = ClassPatches(model, class_index)
        if patches.n_target == 0:
            return {"status": "absent_from_tuning_images",
                    "reason": "no held-out training patch has this class as its majority label"}
        rows, columns = [], {}
        for setting in candidate_settings(rankings, config.tuning_rules, config):
            latents = tuple(rankings[setting.rule][:setting.n_latents])
            columns.setdefault(latents, model.codes.columns(latents))
            rows.append(sweep_row(patches, setting, latents, config, False, columns[latents]))
        best, per_rule = None, {}
        for rule in config.tuning_rules:
            mine = [r for r in rows if r["rule"] == rule]
            mine.sort(key=lambda r: (r["other_change_rate"] <= config.max_other_change,
                                     r["target_change_rate"] - r["other_change_rate"]), reverse=True)
            checked = [sweep_row(patches, _setting(r), tuple(rankings[rule][:r["n_latents"]]), config, True)
                       for r in mine[:config.tuning_candidates]]
            if checked:
                per_rule[rule] = max(checked, key=lambda r: _preference(r, config))
                if best is None or _preference(per_rule[rule], config) > _preference(best, config):
                    best = per_rule[rule]
    if best is None:
        return {"status": "no_candidates", "reason": "no ranking holds a latent for this class"}
    return {"status": "tuned", "n_images": model.n_images, "target_patches": patches.n_target,
            "setting": _setting(best).__dict__, "row": best, "per_rule": per_rule, "sweep": rows}


def _setting(row: dict) -> Setting:
    return Setting(row["rule"], int(row["n_latents"]), row["mode"], float(row["scale"]))


# ---------------------------------------------------------------------------------------------------------------
# Validation


def measure(patches: ClassPatches, latents: tuple[int, ...], setting: Setting, config: SuppressionConfig,
            weights_RB: np.ndarray) -> dict:
    """One setting on validation: patch-level change rates of the edit and both controls with 95% bootstrap
    intervals over images, the verdict, the TPP score, and pixel-level IoU and accuracy (with the interval of the
    target IoU change)."""
    model, class_index = patches.model, patches.class_index
    counts = patches.changed(latents, setting.mode, setting.scale)
    draws = patches.draws(latents, config)
    controls = patches.controls(counts["edit"], draws, setting.scale, setting.mode)
    m = {**patches.rates(counts)}
    for name, per_image in (("target", (counts["target_B"], patches.target_B)),
                            ("other", (counts["other_B"], patches.other_B))):
        m[f"{name}_change_rate_ci_low"], m[f"{name}_change_rate_ci_high"] = ratio_interval(weights_RB, *per_image)
    for name, per_seed in controls.items():
        seed_rates = [patches.rates(c) for c in per_seed]
        for group, total_B in (("target", patches.target_B), ("other", patches.other_B)):
            key = f"{name}_{group}_change_rate"
            m[key] = float(np.mean([r[f"{group}_change_rate"] for r in seed_rates]))
            # The seeds pooled per image: the interval of the mean over draws.
            moved_B = sum(c[f"{group}_B"] for c in per_seed)
            m[f"{key}_ci_low"], m[f"{key}_ci_high"] = ratio_interval(weights_RB, moved_B, total_B * len(per_seed))
        m[f"{name}_target_change_max"] = float(max(r["target_change_rate"] for r in seed_rates))
    m["specific"] = is_class_specific(m["target_change_rate"], m["other_change_rate"],
                                      [m[f"{n}_target_change_max"] for n in CONTROLS], config)
    m["target_patch_accuracy"] = _ratio(int((counts["pred_N"][patches.target_N] == class_index).sum()),
                                        patches.n_target)
    m["tpp_score"] = tpp_score(model.patch.labels_N, model.patch.pred_N, counts["pred_N"], class_index)
    m["active_tokens"] = len(counts["edit"].tokens_U)
    before = ImageCounts(class_index, model.pixel_labels_BHW, model.codes.pixel_pred_BHW)
    after_counts = ImageCounts(class_index, model.pixel_labels_BHW, model.codes.pixel_pred_BHW)
    after = ConfusionMatrix.from_counts(model.pixel.counts_after(model.patch, edit_shift(model, counts["edit"]),
                                                                 after_counts))
    m.update(pixel_measures(model.pixel_before, after, class_index))
    m["target_iou_change"] = m["target_iou_after"] - m["target_iou_before"]
    m["target_iou_change_ci_low"], m["target_iou_change_ci_high"] = iou_change_interval(weights_RB, before,
                                                                                       after_counts)
    out = {"setting": setting.__dict__, "latents": list(latents),
           "values": [float(v) for v in setting.scale * model.max_activation_S[list(latents)]], "metrics": m,
           "most_moved_other_classes": most_moved(model.pixel_before, after, class_index)}
    out["controls"] = {"random_latents": {"latents_per_seed": [list(r) for r, _ in draws]}}
    return out


def dose_response(patches: ClassPatches, ranking: tuple[int, ...], rule: str, configured_n: int,
                  config: SuppressionConfig) -> list[dict]:
    """Validation, patch level: every N of the sweep x mode x scale for the configured rule's ranking; the rows of
    the configured N carry their controls and verdict (these give the optimistic `n_specific_oracle`)."""
    rows = []
    for setting in candidate_settings({rule: ranking}, (rule,), config):
        latents = tuple(ranking[:setting.n_latents])
        rows.append(sweep_row(patches, setting, latents, config, setting.n_latents == configured_n))
    return rows


def study_class(model: SuppressionModel, tuning: SuppressionModel | None, class_index: int,
                latents: tuple[int, ...], rule: str, rankings: dict[str, tuple[int, ...]],
                config: SuppressionConfig = SuppressionConfig(), seed: int = 0) -> dict:
    """Everything a class's report holds, as plain numbers (NaN where undefined): the configured setting and the
    one tuned on `tuning` (held-out training images), each measured on validation `model`."""
    with single_thread():
        return _study_class(model, tuning, class_index, latents, rule, rankings, config, seed)


def _study_class(model, tuning, class_index, latents, rule, rankings, config, seed) -> dict:
    n_pixels = int(model.pixels_BC[:, class_index].sum())
    n_patches = int((model.patch.labels_N == class_index).sum())
    base = {"class_index": class_index, "latents": list(latents), "rule": rule, "scale": float(config.scale),
            "mode": config.mode, "target_pixels": n_pixels, "target_patches": n_patches,
            "config": config.model_dump(mode="json"), "specificity_rule": config.specificity_rule()}
    if n_pixels == 0:
        return {**base, "status": "absent_from_validation",
                "reason": "no validation pixel carries this class: nothing to measure"}
    if not latents:
        return {**base, "status": "no_latents", "reason": "no latents were chosen for this class (see class_latents)"}
    weights_RB = bootstrap_weights(model.n_images, config.bootstrap_resamples, [config.seed, class_index])
    patches = ClassPatches(model, class_index)
    configured = measure(patches, latents, Setting(rule, len(latents), config.mode, config.scale), config,
                         weights_RB)
    tuned = {"status": "no_tuning_images", "reason": "no held-out training images were given"}
    if tuning is not None:
        tuned = tune(tuning, class_index, rankings, config)
    if tuned["status"] == "tuned":
        setting = Setting(**tuned["setting"])
        tuned_latents = tuple(rankings[setting.rule][:setting.n_latents])
        tuned.update(measure(patches, tuned_latents, setting, config, weights_RB))
        tuned["per_rule_validation"] = {
            r: sweep_row(patches, _setting(row), tuple(rankings[r][:row["n_latents"]]), config, True)
            for r, row in tuned["per_rule"].items()}
    return {**base, "status": "evaluated", "reason": "", "values": configured["values"],
            "metrics": configured["metrics"], "controls": configured["controls"],
            "specific": bool(configured["metrics"]["specific"]),
            "most_moved_other_classes": configured["most_moved_other_classes"], "tuned": tuned,
            "dose_response": dose_response(patches, rankings.get(rule) or tuple(latents), rule, len(latents),
                                           config)}
