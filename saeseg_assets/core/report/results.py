"""The suppression study's results as frozen records, each field documented here and nowhere else: a class's report
(report.json), the summary (summary.json, classes.json, the CSV tables), and the one writer and reader of the files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..settings import SuppressionSettings
from ..store.artifacts import write_atomic
from .records import INLINE, column, dumps, loads

# Of report.json, summary.json and classes.json; 3: typed records (nested settings, controls and intervals, null for
# NaN), the version under "format_version" in every file.
# 4: intervals in the classes table, the oracle an upper bound of every count; 5: intervals on every validation
# sweep row, the verdict per shared resample, intervals on the summary's counts.
# 6: the effect rule's choice in the tuning, the tuning's overfit gap in the summary.
FORMAT_VERSION = 7  # 7: the one-SE rule's choice beside the tuning's plain best, both measured on validation
NOT_TUNED = "not tuned"  # the tuned setting in words, for a class without one
R = TypeVar("R")


@dataclass(frozen=True)
class Setting:
    """One way of suppressing a class: the top `n_latents` of the `rule`'s ranking, each set to `scale` x its largest
    training activation, on every token (`mode` every_token) or only where a chosen latent fires (where_active)."""

    rule: str
    n_latents: int
    mode: str
    scale: float


@dataclass(frozen=True)
class Interval:
    """A 95% percentile bootstrap interval over the validation images (NaN where no resample defines the figure)."""

    low: float
    high: float


@dataclass(frozen=True)
class Control:
    """One control of a setting at patch level, over its seeds: random latents (as many as suppressed, matched in
    firing frequency) or a random unit direction given the edit's own norm on every token."""

    target_change_rate: float  # mean over the seeds of the share of the class's patches whose prediction changed
    other_change_rate: float  # the same for the other labelled patches
    target_change_max: float  # the largest single seed's target change rate: what the verdict compares with
    target_change_rate_ci: Interval | None = None  # measured settings only: the seeds pooled per image
    other_change_rate_ci: Interval | None = None


@dataclass(frozen=True)
class SweepRow:
    """One setting at patch level: a row of the tuning sweep or of the validation dose-response, and the patch part of
    a measured setting. The controls and the verdict where they were measured, the intervals on measured settings;
    None elsewhere. Target patches: majority label c; other patches: any other label but 0 ("other")."""

    setting: Setting = field(metadata=INLINE)
    active_tokens: int  # tokens where a chosen latent fires: edited in both modes
    target_change_rate: float  # share of the target patches whose prediction changed (NaN: no target patch)
    other_change_rate: float  # share of the other patches whose prediction changed
    target_patch_accuracy: float  # share of the target patches predicted as the class after the edit
    random_latents: Control | None = None
    random_direction: Control | None = None
    specific: bool | None = None  # the verdict (SuppressionSettings.specificity_rule) against the controls' maxima
    target_change_rate_ci: Interval | None = None
    other_change_rate_ci: Interval | None = None
    # Validation rows with controls: the verdict on each of the study's bootstrap resamples of the validation images
    # that every class shares (class_study.shared_resamples), "1" where class-specific; the summary adds them up,
    # class by class, into the intervals of its counts.
    specific_resamples: str = ""


@dataclass(frozen=True)
class PixelFigures:
    """A measured setting at pixel level (the probe's logits upsampled bilinearly to the crop), before and after."""

    target_iou_before: float  # the class's IoU
    target_iou_after: float
    target_iou_change: float  # after minus before
    target_iou_change_ci: Interval  # both IoUs computed on each resample of the images
    target_accuracy_before: float  # share of the class's pixels predicted as it
    target_accuracy_after: float
    other_miou_before: float  # mean IoU of the other classes present in the ground truth
    other_miou_after: float


@dataclass(frozen=True)
class MovedClass:
    """Another class present in the ground truth, and how the edit moved its pixel IoU."""

    class_index: int
    class_key: str
    iou_before: float
    iou_after: float
    iou_change: float


@dataclass(frozen=True)
class Measured:
    """One setting measured once on the validation images: its patch-level figures with both controls, the verdict
    and intervals; the TPP score; its pixel-level figures."""

    patch: SweepRow = field(metadata=INLINE)
    latents: tuple[int, ...]  # the suppressed latents: the top n of the rule's ranking
    values: tuple[float, ...]  # what each is set to: scale x its largest training activation
    tpp_score: float  # SAEBench's targeted probe perturbation per patch: the class's accuracy drop minus the others'
    pixels: PixelFigures = field(metadata=INLINE)
    most_moved_other_classes: tuple[MovedClass, ...]  # the five other present classes whose IoU moved most
    random_latents_per_seed: tuple[tuple[int, ...], ...]  # the random-latent control's draws

    @property
    def setting(self) -> Setting:
        return self.patch.setting

    @property
    def specific(self) -> bool:
        return bool(self.patch.specific)


@dataclass(frozen=True)
class EffectChoice:
    """The effect rule's ranking of one class, made on the held-out training images alone (study.effect)."""

    latents: tuple[int, ...]  # the greedy set in the order added, then the other candidates by their own effect
    n_chosen: int  # the greedy set's size: where one more latent stopped raising target minus other change enough
    gains: tuple[float, ...]  # the set's best target minus other change rate after each latent was added
    pool: int  # candidates scored alone: the other rules' top latents, taken in turn


@dataclass(frozen=True)
class Tuning:
    """How the setting of a class was tuned on held-out training images, never validation: every candidate's change
    rates, the best candidates per rule with their controls, the best of them and the one chosen (class_study.choose:
    with `tuning_one_se` the simplest within one bootstrap standard error of the best, else the best)."""

    status: str  # tuned | no_tuning_images | absent_from_tuning_images | no_candidates
    reason: str = ""  # why not tuned
    n_images: int = 0  # held-out training images tuned on
    target_patches: int = 0  # their patches of the class
    chosen: SweepRow | None = None  # the chosen candidate (its figures on the tuning images)
    per_rule: dict[str, SweepRow] = field(default_factory=dict)  # each rule's chosen candidate, among its own
    sweep: tuple[SweepRow, ...] = ()  # every candidate, without controls
    effect: EffectChoice | None = None  # the effect rule's ranking, where the tuning used that rule
    best: SweepRow | None = None  # the preferred candidate (class_study._preference): the choice without the 1-SE rule
    # The bootstrap standard error over the tuning images of the best's margin (target change rate minus the largest
    # of the other patches' and each control draw's): the noise the one-SE rule allows.
    best_margin_se: float = float("nan")

    @property
    def setting(self) -> Setting | None:
        return self.chosen.setting if self.chosen else None


@dataclass(frozen=True)
class Selection:
    """The class's latents as class_latents chose them: the configured rule's top latents and their scores."""

    rule: str
    latents: tuple[int, ...]
    scores: tuple[float, ...] = ()


@dataclass(frozen=True)
class ClassReport:
    """report.json: one class's suppression study. Evaluated classes hold the configured and the tuned setting, each
    measured once on validation, and the validation sweep of the configured rule; the others say why not."""

    class_key: str  # NNN_slug
    class_name: str
    class_index: int  # the ADE mask value, the probe's output index
    status: str  # evaluated | absent_from_validation | no_latents
    reason: str  # why not evaluated ("" when evaluated)
    selection: Selection
    setting: Setting  # the configured setting: the selection's rule and latents, the configured mode and scale
    target_pixels: int  # validation pixels labelled the class
    target_patches: int  # validation patches of majority label the class
    specificity_rule: str  # the verdict's rule in words
    config: SuppressionSettings
    configured: Measured | None = None  # the configured setting on validation
    tuning: Tuning | None = None
    tuned: Measured | None = None  # the tuned setting on validation
    tuned_per_rule: dict[str, SweepRow] = field(default_factory=dict)  # each rule's tuned setting on validation
    dose_response: tuple[SweepRow, ...] = ()  # the rule's N x mode x scale grid; controls at the configured N
    tuned_best: SweepRow | None = None  # the tuning's best (Tuning.best) on validation, with controls and intervals
    inputs: dict[str, str] = field(default_factory=dict)  # store keys of what the report was made from

    @property
    def evaluated(self) -> bool:
        return self.status == "evaluated"

    @property
    def specific(self) -> bool:
        return self.configured is not None and self.configured.specific


# ---------------------------------------------------------------------------------------------------------------
# The summary


@dataclass(frozen=True)
class SummaryRow:
    """A row of summary.csv: one evaluated class with its configured and tuned settings on validation (tuned
    columns prefixed `tuned_`, empty where the class was not tuned)."""

    class_index: int
    class_key: str
    class_name: str
    target_patches: int
    target_pixels: int
    configured: Measured = field(metadata=INLINE)
    tuned: Measured | None


@dataclass(frozen=True)
class DoseRow:
    """A row of dose_response.csv: one class's validation sweep row."""

    class_key: str
    row: SweepRow = field(metadata=INLINE)


CLASSES, CLASSES_TUNED = "classes", "classes_tuned"  # the two narrow views of the classes table
CLASS_VIEWS = (CLASSES, CLASSES_TUNED)


@dataclass(frozen=True)
class ClassRow:
    """A row of the summary's classes table (classes.json; whole in report.html, as two narrow views in the UI):
    change rates are shares of patches whose prediction changed, IoU at pixel level."""

    class_key: str = field(metadata=column("class", CLASSES, CLASSES_TUNED))
    class_name: str = field(metadata=column("name"))
    target_patches: int = field(metadata=column("patches", CLASSES))
    target_change_rate: float = field(metadata=column("target", CLASSES))
    target_change_rate_ci: Interval  # each `<rate>_ci` shows in tables in the cell of its rate: 0.97 [0.93, 0.99]
    other_change_rate: float = field(metadata=column("other", CLASSES))
    other_change_rate_ci: Interval
    random_latents_target_change_rate: float = field(metadata=column("rand. latents", CLASSES))
    random_latents_target_change_rate_ci: Interval
    random_direction_target_change_rate: float = field(metadata=column("rand. direction", CLASSES))
    random_direction_target_change_rate_ci: Interval
    target_iou_before: float = field(metadata=column("IoU before", CLASSES))
    target_iou_after: float = field(metadata=column("IoU after", CLASSES))
    tpp_score: float = field(metadata=column("TPP", CLASSES))
    specific: bool = field(metadata=column("specific", CLASSES))
    tuned_setting: str = field(metadata=column("tuned setting", CLASSES_TUNED))  # in words, or NOT_TUNED
    tuned_target_change_rate: float = field(metadata=column("tuned target", CLASSES_TUNED))
    tuned_target_change_rate_ci: Interval
    tuned_other_change_rate: float = field(metadata=column("tuned other", CLASSES_TUNED))
    tuned_other_change_rate_ci: Interval
    tuned_specific: bool | None = field(metadata=column("tuned specific", CLASSES_TUNED))


@dataclass(frozen=True)
class ClassCounts:
    """Evaluated classes measured at one setting on validation (patch level, with controls)."""

    n_classes: int = field(metadata=column("classes"))
    n_specific: int = field(metadata=column("specific"))  # class-specific among them
    n_specific_ci: Interval  # 95% interval of that count over the shared resamples of the validation images
    mean_target_change_rate: float = field(metadata=column("mean target"))
    mean_other_change_rate: float = field(metadata=column("mean other"))


@dataclass(frozen=True)
class SettingCount:
    """A row of specific_counts.csv: one validation setting of the sweep at the configured N, over the classes."""

    n_latents: int = field(metadata=column("N"))
    mode: str = field(metadata=column("mode"))
    scale: float = field(metadata=column("scale"))
    counts: ClassCounts = field(metadata=INLINE)


@dataclass(frozen=True)
class RuleRow:
    """A row of rules.csv: one ranking rule, each class at that rule's own tuned setting on validation."""

    rule: str = field(metadata=column("rule"))
    counts: ClassCounts = field(metadata=INLINE)
    # The overfit of the tuning: the mean over classes of the target (other) change rate of the rule's tuned setting
    # on the tuning images minus that on validation.
    mean_target_gap: float = field(metadata=column("target gap"))
    mean_other_gap: float = field(metadata=column("other gap"))
    most_common_setting: str = field(metadata=column("most common tuned setting"))  # in words, or "none"


@dataclass(frozen=True)
class SummaryFigures:
    """The summary's numbers. Means are over the evaluated classes where the figure is defined."""

    n_classes_evaluated: int
    n_specific: int  # class-specific at the configured setting
    n_specific_ci: Interval  # 95% interval of that count over the shared resamples of the validation images
    n_specific_tuned: int  # class-specific at their own tuned setting
    n_specific_tuned_ci: Interval
    n_tuned: int
    tuned: Setting | None  # the most common tuned setting
    n_classes_at_common_tuned_setting: int
    n_absent_from_validation: int
    n_without_latents: int
    mean_tpp_score: float
    mean_tuned_tpp_score: float
    mean_target_change_rate: float
    mean_other_change_rate: float
    mean_random_latents_target_change_rate: float
    mean_random_direction_target_change_rate: float
    mean_tuned_target_change_rate: float
    mean_tuned_other_change_rate: float
    # The tuning's overfit: the tuned setting's mean target (other) change rate on the tuning images minus on
    # validation, over the tuned classes.
    mean_tuned_target_gap: float
    mean_tuned_other_gap: float
    # The same figures for the tuning's plain best (Tuning.best, the choice without the one-SE rule) on validation,
    # over the same classes: what the rule changed.
    n_specific_best: int
    n_specific_best_ci: Interval
    mean_best_target_change_rate: float
    mean_best_other_change_rate: float
    mean_best_target_gap: float
    mean_best_other_gap: float
    # The gap without a choice: per class the mean over the configured rule's validation sweep (dose_response) of each
    # setting's change rate on the tuning images minus on validation, then the mean over classes; the part of the
    # gaps above that no choice of setting removes.
    mean_unchosen_target_gap: float
    mean_unchosen_other_gap: float
    mean_target_iou_before: float
    mean_target_iou_after: float
    # An upper bound of every count above: classes class-specific at one or more of the settings measured with
    # controls on validation (the sweep at the configured N, the configured and tuned settings, each rule's tuned
    # setting, the tuning's best), chosen per class on the very images counted.
    n_specific_oracle: int
    oracle_setting: str  # the validation setting that alone makes the most classes specific, in words
    configured_setting: str  # the configured setting(s) in words
    n_stale: int  # reports left out: made from other validation codes


@dataclass(frozen=True)
class StudySummary:
    """summary.json: the summary in words (`result`), its figures, and its tables per rule and per setting."""

    result: str
    figures: SummaryFigures
    per_rule: tuple[RuleRow, ...]
    per_setting: tuple[SettingCount, ...]


@dataclass(frozen=True)
class SpecificityGrid:
    """Classes by settings for the heatmap: per cell the verdict (None: not measured), the target and other change
    rates and the first criterion of the rule it fails (measures.unmet_criterion; "" when specific); `groups` are
    (label, first column, end) over the columns; `configured`: the column of the configured setting (-1: none)."""

    rows: tuple[str, ...]
    columns: tuple[str, ...]
    groups: tuple[tuple[str, int, int], ...]
    specific: tuple[tuple[bool | None, ...], ...]
    target: tuple[tuple[float | None, ...], ...]
    other: tuple[tuple[float | None, ...], ...]
    unmet: tuple[tuple[str | None, ...], ...]
    configured: int
    title: str


@dataclass(frozen=True)
class ClassTable:
    """classes.json: the rows of the summary's classes table."""

    rows: tuple[ClassRow, ...]


@dataclass(frozen=True)
class MechanismRow:
    """A row of mechanisms.csv: one class evaluated under both mechanisms, at the configured setting (patch figures
    with controls and intervals) and at each mechanism's own tuned setting (None: not tuned). Shortcut: the edit
    taken into the probe at the SAE's layer; propagate: the edit carried through the rest of the ViT to the
    final-layer probe."""

    class_key: str
    class_name: str
    shortcut: SweepRow
    propagate: SweepRow
    shortcut_tuned: SweepRow | None
    propagate_tuned: SweepRow | None


@dataclass(frozen=True)
class MechanismComparison:
    """mechanisms.json: the classes evaluated under both mechanisms, side by side, and where they disagree."""

    n_classes: int  # classes evaluated under both mechanisms
    n_specific_shortcut: int  # class-specific at the configured setting, shortcut
    n_specific_propagate: int  # the same under propagate
    n_specific_tuned_shortcut: int  # class-specific at the class's tuned setting, shortcut
    n_specific_tuned_propagate: int  # the same under propagate (its own, smaller tuning grid)
    sentence: str  # the counts and the disagreements in words
    rows: tuple[MechanismRow, ...]


# ---------------------------------------------------------------------------------------------------------------
# The files


def write_result(path: Path, record: ClassReport | StudySummary | ClassTable | MechanismComparison) -> None:
    """report.json, summary.json, classes.json or mechanisms.json as strict JSON, written whole (NaN as null)."""
    write_atomic(Path(path), dumps(record, FORMAT_VERSION))


def read_result(path: Path, kind: type[R]) -> R:
    """The record `write_result` wrote, of type `kind`; a file of another format is refused, naming it."""
    return loads(kind, Path(path).read_text(), FORMAT_VERSION, str(path))
