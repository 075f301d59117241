"""Every setting of the pipeline's stages, each written once: name, type, default and a one-sentence doc.

Free of torch, so the Dagster layer builds its launchpad config from these models when the definitions load.
"""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A latent is dense when it fires on at least this share of tokens (the reference's rule b, and our dense_fraction).
DENSE_FREQUENCY = 1e-2
# Gao et al. (2024) call a latent dead after 10M tokens without firing; small caches need a shorter window.
MAX_DEAD_TOKENS = 10_000_000
TRAINED_ARCHITECTURES = ("topk", "relu", "batchtopk")  # imports may also bring jumprelu (sae.model.ARCHITECTURES)
TARGETS = ("soft", "majority")
RULES = ("f1", "activation_sum", "probe_aware")  # rank latents from the latent statistics (class_latents)
# The tuning's rules: those, and `effect`, which ranks by measured suppression on the tuning images (study.effect).
TUNING_RULES = (*RULES, "effect")
MODES = ("every_token", "where_active")
PROBE_LAYERS = ("sae", "final")
MECHANISMS = ("shortcut", "propagate")


class StageSettings(BaseModel):
    """A frozen record of settings. `identity()` is what decides the output: operational fields (logging, block
    sizes that change speed only) are left out of it, so changing them reuses what exists. The device is not a
    setting of a stage: it is the pipeline's (env SAESEG_DEVICE), passed to the core functions that compute."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset()

    def identity(self) -> dict:
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in self.OPERATIONAL}


class TrainSettings(StageSettings):
    """How the SAE is trained on the training activations (defaults fit the embedded demo)."""

    # The demo's defaults, k = 48 over 8 passes, were chosen by held-out FVU on its validation cache (the
    # sae_fvu_within_bound check, <= 0.2): 0.181, where k = 32 over 10 passes gave 0.211 (training FVU 0.07: the
    # images differ between the splits, and a larger k generalizes where a smaller expansion or fewer passes did not).
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset({"log_every_steps", "save_every_s"})
    _TOPK_ONLY: ClassVar[tuple[str, ...]] = ("k", "aux_k", "aux_coeff", "dead_tokens")
    _RELU_ONLY: ClassVar[tuple[str, ...]] = ("l1_coeff",)

    architecture: str = Field("topk", description="The SAE's activation: 'topk' keeps the k largest pre-activations "
                              "per token and trains dead latents with the AuxK loss; 'relu' is the original "
                              "experiment's ReLU with an L1 penalty; 'batchtopk' keeps the batch_size x k largest of "
                              "each batch (k per token on average, AuxK as topk) and encodes new tokens with a "
                              "threshold estimated during training.")
    expansion: int = Field(16, description="Latents per model dimension, so the SAE has expansion x d_model latents.")
    k: int = Field(48, description="Latents active per token for topk, per token on average for batchtopk.")
    l1_coeff: float = Field(4e-3, description="Weight of the L1 penalty sum|f| per token for the relu architecture, "
                            "on inputs scaled to unit variance per dimension.")
    aux_k: int = Field(0, description="Dead latents that model the residual in the AuxK loss; 0 means d_model / 2.")
    aux_coeff: float = Field(1 / 32, description="Weight of the AuxK loss relative to the reconstruction loss.")
    dead_tokens: int = Field(0, description="Tokens without firing after which a latent counts as dead for AuxK; "
                             "0 means half a pass over the training cache, at most 10 million.")
    lr: float = Field(2e-3, description="Adam's peak learning rate.")
    warmup_steps: int = Field(50, description="Optimizer steps of linear learning-rate warm-up from 0.")
    decay_fraction: float = Field(0.8, description="Final share of the steps over which the learning rate falls "
                                  "linearly to 0.")
    grad_clip: float = Field(1.0, description="Largest global gradient norm; larger gradients are scaled down.")
    batch_size: int = Field(1024, description="Tokens per optimizer step.")
    train_tokens: int = Field(491_520, description="Tokens to train on in all; the cache is passed over repeatedly, "
                              "shuffled anew each pass (the default is 8 passes over the embedded demo).")
    seed: int = Field(0, description="Seed of the initialization and the data order.")
    buffer_images: int = Field(64, description="Images whose tokens are mixed in the shuffle buffer; memory is about "
                               "buffer_images x patches x d_model x 2 bytes.")
    bf16: bool = Field(False, description="Whether the encoder matmul runs under bf16 autocast (meant for cuda).")
    log_every_steps: int = Field(50, description="Optimizer steps between progress lines (tokens/s, loss, FVU, L0).")
    save_every_s: float = Field(60.0, description="Seconds between saves of the trainer state, from which a killed "
                                "run resumes.")

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.architecture not in TRAINED_ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r}: expected one of {TRAINED_ARCHITECTURES}")
        if min(self.expansion, self.batch_size, self.train_tokens, self.buffer_images) < 1:
            raise ValueError("expansion, batch_size, train_tokens and buffer_images must be at least 1")
        return self

    @property
    def total_steps(self) -> int:
        return max(1, self.train_tokens // self.batch_size)

    def identity(self) -> dict:
        ignored = self._TOPK_ONLY if self.architecture == "relu" else self._RELU_ONLY
        return {k: v for k, v in super().identity().items() if k not in ignored}


class SweepSettings(StageSettings):
    """How the linear probe is trained: one head per (learning rate, weight decay) pair, all on the same batches."""

    lrs: tuple[float, ...] = Field((3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
                                   description="AdamW learning rates of the sweep (the reference's grid).")
    weight_decays: tuple[float, ...] = Field((1e-1, 1e-3, 1e-5), description="AdamW (decoupled) weight decays of "
                                             "the sweep; every pair with a learning rate is one head.")
    epochs: int = Field(10, description="Passes over the training images, the held-out ones excluded.")
    batch_size: int = Field(1024, description="Patch tokens per AdamW step, shared by all heads.")
    held_out_fraction: float = Field(0.2, description="Share of the training cache's chunks held out to select the "
                                     "head by pixel mIoU; validation is never used for training or selection.")
    seed: int = Field(0, description="Seed of the held-out draw and the token shuffling.")
    target: str = Field("soft", description="Training target per patch: 'soft' is its pixel-label shares (per-pixel "
                        "cross-entropy), 'majority' its majority label; label 0 is ignored either way.")
    buffer_images: int = Field(256, description="Images whose tokens are mixed in the shuffle buffer; bounds memory.")
    probe_layer: str = Field("sae", description="What the probe reads: 'sae' the patch tokens at the SAE's layer "
                             "(the seed's commands), 'final' the backbone's final patch tokens (DINOv2: the final "
                             "LayerNorm of the last hidden state, as the paper's demo reads them).")

    @model_validator(mode="after")
    def _check(self) -> SweepSettings:
        problems = []
        if self.probe_layer not in PROBE_LAYERS:
            problems.append(f"probe_layer must be one of {PROBE_LAYERS}, got {self.probe_layer!r}")
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            problems.append(f"lrs must be positive, got {list(self.lrs)}")
        if not self.weight_decays or any(not (wd >= 0 and math.isfinite(wd)) for wd in self.weight_decays):
            problems.append(f"weight_decays must be >= 0, got {list(self.weight_decays)}")
        if self.epochs < 1 or self.batch_size < 1 or self.buffer_images < 1:
            problems.append("epochs, batch_size and buffer_images must be >= 1")
        if not 0 < self.held_out_fraction < 1:
            problems.append(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        if self.target not in TARGETS:
            problems.append(f"target must be one of {TARGETS}, got {self.target!r}")
        if problems:
            raise ValueError("probe sweep config: " + "; ".join(problems))
        return self

    @property
    def grid(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.lrs for wd in self.weight_decays]


class StatsSettings(StageSettings):
    """How the one statistics pass of the SAE over the training activations runs."""

    OPERATIONAL: ClassVar[frozenset[str]] = frozenset({"block_images"})

    purity: float = Field(0.9, description="A patch is pure when at least this share of its pixels carries its "
                          "majority label; the f1 rule scores on pure patches only.")
    top_patches: int = Field(8, description="Top-activating training patches kept per latent, each from another "
                             "image, for the galleries.")
    block_images: int = Field(16, description="Images encoded per step.")


class SelectionSettings(StageSettings):
    """How each class's latents are chosen from the latent statistics."""

    OPERATIONAL: ClassVar[frozenset[str]] = frozenset({"gallery_patches"})

    rule: str = Field("f1", description="Ranking rule of the configured latents: 'f1' scores a latent by the F1 of "
                      "'it fires' against 'the patch is class c' over pure training patches; 'activation_sum' by its "
                      "summed activation over class-c patches after dropping dense latents; 'probe_aware' by its mean "
                      "activation on class-c patches times what its decoder row adds to class c's logit margin.")
    k: int = Field(3, description="Latents kept per class under the configured rule, best first.")
    ranked: int = Field(50, description="Latents ranked per class under every rule, for the latent-count sweep of "
                        "the suppression study (its largest number of latents).")
    dense_frequency: float = Field(DENSE_FREQUENCY, description="The activation_sum rule drops latents that fire on "
                                   "at least this share of training tokens.")
    gallery_patches: int = Field(6, description="Top-activating training patches shown per latent in the gallery.")

    @model_validator(mode="after")
    def _check(self) -> SelectionSettings:
        if self.rule not in RULES:
            raise ValueError(f"selection rule {self.rule!r}: expected one of {RULES}")
        if self.k < 1 or self.ranked < self.k:
            raise ValueError(f"k = {self.k}, ranked = {self.ranked}: at least one latent per class, and k <= ranked")
        return self


class SuppressionSettings(StageSettings):
    """The configured suppression, its controls, the dose-response sweep and the class-specificity rule."""

    _PROPAGATE_ONLY: ClassVar[tuple[str, ...]] = ("propagate_n_latents", "propagate_scales", "propagate_candidates")

    mechanism: str = Field("shortcut", description="How an edit reaches the probe: 'shortcut' takes the edit at the "
                           "SAE's layer straight into a probe on that layer (the seed's commands); 'propagate' runs "
                           "the rest of the ViT (the later blocks and the final norm) on the edited tokens, CLS and "
                           "registers carried unedited, and reads the probe on the final layer (the paper's demo).")
    propagate_n_latents: tuple[int, ...] = Field((1, 3, 10), description="Under propagate, the numbers of latents "
                                                 "the tuning tries (every setting runs the tail: a smaller grid than "
                                                 "n_latents).")
    propagate_scales: tuple[float, ...] = Field((-2.0, 0.0), description="Under propagate, the scales the tuning "
                                                "tries, in each of dose_modes.")
    propagate_candidates: int = Field(1, description="Under propagate, settings per rule, best by target minus other "
                                      "change rate on the tuning images, whose controls are measured before one is "
                                      "chosen.")
    scale: float = Field(-2.0, description="Each chosen latent is set to scale x its largest activation over the "
                         "training tokens; -2 was the original plan, 0 is plain ablation.")
    mode: str = Field("every_token", description="Where the latents are set: 'every_token' on every token (the "
                      "original work), 'where_active' only on tokens where a chosen latent fires.")
    control_seeds: int = Field(5, description="Draws of each control (random latents, random direction), averaged.")
    seed: int = Field(0, description="Seed of the controls; each class draws its own stream from it.")
    dose_scales: tuple[float, ...] = Field((-4.0, -2.0, -1.0, -0.5, 0.0),
                                           description="Scales of the dose-response sweep.")
    dose_modes: tuple[str, ...] = Field(MODES, description="Modes of the dose-response sweep.")
    n_latents: tuple[int, ...] = Field((1, 2, 3, 5, 10, 20, 50), description="Numbers of latents of the sweep: the "
                                       "top N of a rule's ranking are suppressed together.")
    tuning_rules: tuple[str, ...] = Field(TUNING_RULES, description="Ranking rules the tuning may choose among; "
                                          "'effect' chooses latents by what suppressing them does on the tuning "
                                          "images, its number of latents fixed where adding one stops helping.")
    effect_pool: int = Field(20, description="The effect rule scores this many candidates alone, taken in turn "
                             "from the other rules' rankings.")
    effect_greedy: int = Field(6, description="The effect rule builds its set from this many best-scoring "
                               "candidates, and stops at this many latents.")
    effect_margin: float = Field(0.02, description="The effect rule adds a latent only if it raises the set's best "
                                 "target minus other change rate on the tuning images by at least this.")
    max_other_change: float = Field(0.05, description="Tuning prefers settings whose change rate on the other "
                                    "patches of the held-out training images is at most this.")
    tuning_candidates: int = Field(8, description="Settings per class, best by target minus other change rate on "
                                   "the tuning images, whose controls are measured before one is chosen.")
    tuning_one_se: bool = Field(True, description="Tuning takes not the best setting on the tuning images but the "
                                "simplest (fewest latents, then smallest |scale|, then where_active) that is as "
                                "specific as the best and whose margin is within one bootstrap standard error (over "
                                "the tuning images) of the best's (docs/study.md); off, the best itself.")
    bootstrap_resamples: int = Field(1000, description="Resamples of the validation images for the 95% intervals.")
    frequency_pool: int = Field(16, description="A random-latent control draws among this many latents nearest in "
                                "firing frequency to each chosen one.")
    min_target_change: float = Field(0.5, description="A class counts as specifically suppressed only if at least "
                                     "this share of its patches changes prediction.")
    other_factor: float = Field(3.0, description="A class counts as specifically suppressed only if its target "
                                "change rate is at least this many times the change rate of the other patches.")
    control_factor: float = Field(2.0, description="A class counts as specifically suppressed only if its target "
                                  "change rate is at least this many times the largest target change rate of any "
                                  "single control draw (random latents or random direction, over all seeds).")

    @model_validator(mode="after")
    def _check(self) -> SuppressionSettings:
        for mode in (self.mode, *self.dose_modes):
            if mode not in MODES:
                raise ValueError(f"suppression mode {mode!r}: expected one of {MODES}")
        if not self.n_latents or min(self.n_latents) < 1 or set(self.tuning_rules) - set(TUNING_RULES):
            raise ValueError(f"n_latents {list(self.n_latents)} must be >= 1 and tuning_rules within {TUNING_RULES}")
        if self.effect_pool < 1 or self.effect_greedy < 1:
            raise ValueError("effect_pool and effect_greedy must be at least 1")
        if self.bootstrap_resamples < 1000 or self.tuning_candidates < 1:
            raise ValueError("bootstrap_resamples must be at least 1000 and tuning_candidates at least 1")
        if self.control_seeds < 1:
            raise ValueError(f"control_seeds = {self.control_seeds}: at least one draw per control")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism {self.mechanism!r}: expected one of {MECHANISMS}")
        if not self.propagate_n_latents or min(self.propagate_n_latents) < 1 or not self.propagate_scales \
                or self.propagate_candidates < 1:
            raise ValueError("propagate_n_latents must be >= 1, propagate_scales not empty, propagate_candidates >= 1")
        if not all(math.isfinite(s) for s in (self.scale, *self.dose_scales, *self.propagate_scales)):
            raise ValueError("suppression scales must be finite numbers")
        return self

    def identity(self) -> dict:
        ignored = self._PROPAGATE_ONLY if self.mechanism == "shortcut" else ()
        return {k: v for k, v in super().identity().items() if k not in ignored}

    def dose_grid(self) -> list[tuple[str, float]]:
        """(mode, scale) of the dose-response, with the configured setting included."""
        grid = [(m, float(s)) for m in self.dose_modes for s in self.dose_scales]
        return grid if (self.mode, self.scale) in grid else [*grid, (self.mode, float(self.scale))]

    def tuning_grid(self) -> tuple[tuple[int, ...], list[tuple[str, float]], int]:
        """(numbers of latents, (mode, scale) pairs, candidates per rule whose controls are measured) of the tuning:
        the dose-response's under shortcut, the smaller propagate_* grid under propagate."""
        if self.mechanism == "shortcut":
            return self.n_latents, self.dose_grid(), self.tuning_candidates
        return (self.propagate_n_latents, [(m, float(s)) for m in self.dose_modes for s in self.propagate_scales],
                self.propagate_candidates)

    def specificity_rule(self) -> str:
        """The class-specificity rule in words, as reports state it."""
        return (f"class-specific: at least {self.min_target_change:.0%} of the class's patches change prediction, at "
                f"least {self.other_factor:g}x the change rate of the other patches, and at least "
                f"{self.control_factor:g}x the largest change rate of any single control draw (random latents "
                f"matched in firing frequency, or a random direction of the same norm; {self.control_seeds} "
                f"seed{'s' * (self.control_seeds != 1)} each)")
