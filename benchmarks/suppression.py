"""Suppression cost: one class's whole study (tuning on held-out training images, configured and tuned settings on
validation, sweeps, controls, bootstrap), and all 150 classes, against one full SAE encoding pass over the validation
cache, measured side by side in one run and printed as ratios (targets: one class <= 0.1, all 150 <= 2).

Uses the newest caches in the store under --data and the SAE and probe there (or --sae / --probe); where none exist, a randomly
initialized TopK SAE (d_sae = 16 x d_model, k 32) and a ridge probe fitted on the training cache (flagged).
Usage: python benchmarks/suppression.py [--data data] [--sae DIR] [--probe DIR] [--threads 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saeseg_assets.core.data.ade20k import CLASSES, class_by_key
from saeseg_assets.core.data.cache import CACHE_FOLDER, ActivationCache
from saeseg_assets.core.probe.model import Probe, load_probe
from saeseg_assets.core.probe.sweep import pixel_share_targets, split_held_out
from saeseg_assets.core.report.results import ClassReport, Selection
from saeseg_assets.core.sae.model import Sae, SaeSpec, load_sae
from saeseg_assets.core.settings import (
    RULES,
    SelectionSettings,
    StatsSettings,
    SuppressionSettings,
    SweepSettings,
)
from saeseg_assets.core.store.artifacts import Store
from saeseg_assets.core.study.class_study import study_class
from saeseg_assets.core.study.codes import load_codes, write_codes
from saeseg_assets.core.study.latent_stats import compute_latent_stats
from saeseg_assets.core.study.logit_shift import PatchBaseline, PixelBaseline
from saeseg_assets.core.study.model import SuppressionModel
from saeseg_assets.core.study.rules import margin_effects, select_class_latents


def codes_of(sae, probe, cache: ActivationCache, spans=None):
    """The codes as val_codes writes them (to a scratch folder) and the study reads them back."""
    folder = Path(tempfile.mkdtemp(prefix="saeseg-codes-"))
    try:
        write_codes(folder, sae, probe, cache, log=lambda _: None, spans=spans)
        return load_codes(folder)  # mapped: the tensors stay readable once their files are removed
    finally:
        shutil.rmtree(folder)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.inference_mode()
def sae_pass(sae: Sae, cache: ActivationCache) -> int:
    """One full encoding pass with the SAE's own encoder: what one class must cost a small fraction of."""
    n = 0
    for _, block in cache.iter_blocks(("activations",)):
        x_ND = torch.from_numpy(block["activations"]).float().reshape(-1, cache.d_model)
        vals, _ = sae.encode(x_ND)
        n += len(vals)
    return n


class Stopwatch:
    """Adds up the time spent in one method, to split a class's cost into its patch and pixel parts."""

    def __init__(self, owner, name: str):
        self.total, self.calls = 0.0, 0
        original = getattr(owner, name)

        def timed_method(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0
                self.calls += 1

        setattr(owner, name, timed_method)

    def take(self) -> tuple[float, int]:
        out = (self.total, self.calls)
        self.total, self.calls = 0.0, 0
        return out


def ridge_probe(cache: ActivationCache, lam: float = 1.0) -> Probe:
    """A least-squares probe on pixel-share targets: a stand-in with realistic margins when no probe is trained."""
    x = np.concatenate([cache.read("activations", a, min(a + 16, cache.n_images)).reshape(-1, cache.d_model)
                        for a in range(0, cache.n_images, 16)]).astype(np.float64)
    y = np.concatenate([pixel_share_targets(cache.read("pixel_labels", a, min(a + 16, cache.n_images)), cache.grid)
                        for a in range(0, cache.n_images, 16)]).astype(np.float64)
    mean = x.mean(0)
    xc = x - mean
    W = np.linalg.solve(xc.T @ xc + lam * len(x) * np.eye(x.shape[1]), xc.T @ (y - y.mean(0)))
    weight = torch.from_numpy(W.T).float() * 10
    bias = torch.from_numpy((y.mean(0) - mean @ W) * 10).float()
    return Probe(weight, bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data")
    parser.add_argument("--sae", default="", help="SAE checkpoint folder (default: the newest sae_weights in <data>)")
    parser.add_argument("--probe", default="", help="probe checkpoint folder (default: the newest probe_checkpoint)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--class-key", default="010_grass")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    store = Store(args.data)
    caches = {asset: store.newest(asset) for asset in ("train_activations", "val_activations")}
    if None in caches.values():
        raise SystemExit(f"no activation caches under {args.data}: run `make demo` first")
    train = ActivationCache(caches["train_activations"] / CACHE_FOLDER)
    val = ActivationCache(caches["val_activations"] / CACHE_FOLDER)
    sae_dir = Path(args.sae or store.newest("sae_weights") or "none")
    probe_dir = Path(args.probe or store.newest("probe_checkpoint") or "none")
    if (sae_dir / "sae.json").exists():
        sae, _ = load_sae(sae_dir)
        sae_source = str(sae_dir)
    else:
        first = train.read("activations", 0, min(32, train.n_images))
        mean = torch.from_numpy(first).float().reshape(-1, train.d_model)
        sae = Sae.initialized(SaeSpec("topk", train.d_model, 16 * train.d_model, 32), mean.mean(0), seed=0)
        sae_source = "random TopK init (no trained SAE found)"
    trained_probe = (probe_dir / "probe.json").exists()
    probe = load_probe(probe_dir) if trained_probe else ridge_probe(train)
    probe_source = str(probe_dir) if trained_probe else "ridge stand-in"
    print(f"val cache: {val.n_images} images x {val.n_patches} patches, d_model {val.d_model}; SAE d_sae "
          f"{sae.spec.d_sae} ({sae.spec.architecture}, k {sae.spec.k}) from {sae_source}; probe: {probe_source}; "
          f"torch threads {torch.get_num_threads()}")

    t_stats, stats = timed(lambda: compute_latent_stats(sae, train, StatsSettings(), log=lambda _: None), 1)
    t_codes, codes = timed(lambda: codes_of(sae, probe, val), 1)
    labels_N = torch.from_numpy(val.read("patch_labels", 0, val.n_images)).reshape(-1)
    pixels = torch.from_numpy(val.read("pixel_labels", 0, val.n_images))
    t_model, model = timed(lambda: SuppressionModel(sae.W_dec_SD.detach(), probe.weight_CD, stats.act_max_S,
                                                    stats.frequency_S, codes, labels_N, pixels, val.grid), 1)
    held = split_held_out(train, SweepSettings().held_out_fraction, SweepSettings().seed)[1]
    t_tuning, tuning_codes = timed(lambda: codes_of(sae, probe, train, held), 1)
    tuning = SuppressionModel(sae.W_dec_SD.detach(), probe.weight_CD, stats.act_max_S, stats.frequency_S, tuning_codes,
                              torch.from_numpy(np.concatenate([train.read("patch_labels", a, b) for a, b in held]))
                              .reshape(-1), torch.from_numpy(np.concatenate([train.read("pixel_labels", a, b)
                                                                             for a, b in held])), train.grid, False)
    config = SuppressionSettings()
    selection = SelectionSettings()
    W_dec, probe_W = sae.W_dec_SD.detach().numpy(), probe.weight_CD.numpy()
    rankings, selections = {}, {}
    for c in CLASSES:
        effect = margin_effects(W_dec, probe_W, stats.class_patches_C > 0, c.index)
        selections[c.index] = Selection(selection.rule, select_class_latents(stats, c.index, selection,
                                                                          margin_effect_S=effect).latents)
        rankings[c.index] = {rule: select_class_latents(stats, c.index, selection, rule, selection.ranked,
                                                        effect).latents for rule in RULES}
    target = class_by_key(args.class_key).index

    def study(c: int) -> ClassReport:
        return study_class(model, tuning, c, selections[c], rankings[c], config)

    pixel_clock = Stopwatch(PixelBaseline, "counts_after")
    patch_clock = Stopwatch(PatchBaseline, "predictions_after")
    t_sae, _ = timed(lambda: sae_pass(sae, val), args.repeats)
    t_one, one = timed(lambda: study(target), args.repeats)
    (pixel_one, n_pixel), (patch_one, n_patch) = pixel_clock.take(), patch_clock.take()
    t_all, reports = timed(lambda: [study(c) for c in selections], 1)
    (pixel_all, _), (patch_all, _) = pixel_clock.take(), patch_clock.take()
    t_sae_after, _ = timed(lambda: sae_pass(sae, val), args.repeats)
    t_sae = statistics.median([t_sae, t_sae_after])
    evaluated = sum(r.evaluated for r in reports)
    r = args.repeats

    print(f"shared, once per run: latent stats over training {t_stats:.2f} s, val codes {t_codes:.2f} s, "
          f"tuning codes {t_tuning:.2f} s, baseline margins {t_model:.2f} s")
    print(f"full SAE encoding pass over validation: {t_sae:.3f} s (median, before and after the class runs)")
    print(f"one class ({args.class_key}, {one.status}, latents {list(selections[target].latents)}): {t_one:.3f} s  "
          f"ratio {t_one / t_sae:.3f}  (target <= 0.1)")
    if n_patch:
        print(f"  patch level: {n_patch // r} evaluations (sweeps, tuning, controls) {patch_one / r:.3f} s, ratio "
              f"{patch_one / r / t_sae:.3f}; pixel level: {n_pixel // r} evaluations (configured setting and its "
              f"controls) {pixel_one / r:.3f} s, ratio {pixel_one / r / t_sae:.3f}; one patch + one pixel "
              f"evaluation (the configured edit alone) about {(patch_one / n_patch + pixel_one / n_pixel) / t_sae:.3f}")
    print(f"all 150 classes ({evaluated} present with latents): {t_all:.2f} s  ratio {t_all / t_sae:.2f}  "
          f"(target <= 2); patch level {patch_all:.2f} s, pixel level {pixel_all:.2f} s")
    if one.configured is not None:
        m = one.configured.patch
        print(f"{args.class_key} at scale {config.scale:g}, {config.mode}: "
              f"target change {m.target_change_rate:.3f}, "
              f"other {m.other_change_rate:.3f}, random latents {m.random_latents.target_change_rate:.3f}, "
              f"random direction {m.random_direction.target_change_rate:.3f}")
    print("Timings are wall clock on a shared machine: compare the ratios, not the seconds.")


if __name__ == "__main__":
    main()
