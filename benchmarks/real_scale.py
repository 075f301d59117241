"""Wall time and peak RSS of the pipeline's shared stages and of the per-class suppression study at ADE20K's shape
through DINOv2 ViT-B/14, on synthetic caches written once under --work and reused; each stage in its own process.
Usage: python benchmarks/real_scale.py [--val-images 2000] [--tuning-images 4000] [--d-model 768] [--d-sae 24576]
       [--k 64] [--classes 10] [--device cpu|cuda] [--threads N] [--workers N] [--seed 0]
       [--work data/benchmarks/real_scale] [--keep] [--reuse RUN]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from saeseg_assets.core.data.ade20k import N_CLASSES, class_by_index, patch_labels
from saeseg_assets.core.data.cache import CACHE_FOLDER, ActivationCache, CacheProvenance, CacheWriter
from saeseg_assets.core.probe.model import Probe, load_probe, save_probe
from saeseg_assets.core.probe.sweep import pixel_share_targets, tuning_spans
from saeseg_assets.core.report.results import Selection
from saeseg_assets.core.sae.model import Sae, SaeSpec, load_sae, save_sae
from saeseg_assets.core.settings import RULES, SelectionSettings, StatsSettings, SuppressionSettings
from saeseg_assets.core.store.artifacts import OutputSpec, Store
from saeseg_assets.core.study.codes import load_codes, write_codes
from saeseg_assets.core.study.latent_stats import compute_latent_stats, load_latent_stats, save_latent_stats
from saeseg_assets.core.study.model import load_model
from saeseg_assets.core.study.rules import margin_effects, select_class_latents

# The study as assets/reports.py calls it.
from saeseg_assets.core.study.workers import machine_cores, study_classes

INPUTS_VERSION = 1  # of the synthetic inputs' construction: bump when its code changes (its constants are in the key)
REAL_TRAINING_IMAGES = 20_210  # ADE20K's training split: what latent_stats reads in the real pipeline
# objectInfo150.txt's Ratio (share of all pixels) at some ranks; ADE20K numbers its classes by it, so this is the
# long tail from wall to flag. Ranks between are interpolated in log-log; label 0 ("other") takes what is left (9%).
RATIO_ANCHORS = {1: 0.1576, 2: 0.1072, 3: 0.0878, 4: 0.0621, 5: 0.0480, 7: 0.0398, 8: 0.0231, 10: 0.0183, 15: 0.0118,
                 20: 0.0103, 22: 0.0074, 30: 0.0044, 33: 0.0033, 40: 0.0023, 50: 0.0018, 60: 0.0015, 75: 0.0011,
                 80: 0.0009, 100: 0.0006, 125: 0.0004, 150: 0.0002}
SEGMENTS = (3, 14)  # regions per label map, fewest and most
CLASS_WEIGHT = 4.0  # length of a pure patch's class direction at strength 1: above the texture, so in its top k
STRENGTH = (0.25, 1.25)  # per token, drawn uniformly: how plainly the patch shows its classes
TEXTURE_WEIGHT = 0.5  # mean weight of each of a token's k - 1 texture features
# Per class, drawn uniformly: a class latent's decoder row is its class direction plus this much of a random one
# (cos 0.98 down to 0.86), so class latents range from crisp to poorer, firing on fewer of their patches.
ROW_NOISE = (0.2, 0.6)
# A class latent's encoder bias, as a trained SAE learns one: interference from the k - 1 texture features (about
# 0.2 on any direction) alone never lifts it into a token's top k.
CLASS_THRESHOLD = 1.0
NOISE = 0.5  # norm of each token's isotropic noise
PROBE_GAIN = 2.0


@dataclass(frozen=True)
class Shape:
    """What decides the synthetic inputs; their folder's key is made from it."""

    val_images: int
    tuning_images: int
    d_model: int
    d_sae: int
    k: int
    crop: int
    patch: int
    seed: int
    chunk_images: int = 16  # the recording's default chunk

    @property
    def grid(self) -> int:
        return self.crop // self.patch


# ---------------------------------------------------------------------------------------------------------------
# The synthetic inputs


def pixel_shares() -> np.ndarray:
    """[151] expected share of pixels per label (0 = other), ADE20K's long tail."""
    ranks = np.arange(1, N_CLASSES + 1)
    known = np.array(sorted(RATIO_ANCHORS))
    share_C = np.exp(np.interp(np.log(ranks), np.log(known), np.log([RATIO_ANCHORS[r] for r in known])))
    return np.concatenate([[max(1.0 - share_C.sum(), 0.0)], share_C]) / max(1.0, share_C.sum())


def label_maps(rng: np.random.Generator, n: int, crop: int, share_C: np.ndarray) -> np.ndarray:
    """[n, crop, crop] uint8: each map a power diagram of a few regions, each region's label drawn by pixel share, so
    a label's expected share is the table's and its pixels come in regions, not scattered patches."""
    yy_HW, xx_HW = np.mgrid[0:crop, 0:crop].astype(np.float32)
    out_BHW = np.empty((n, crop, crop), np.uint8)
    for b in range(n):
        m = int(rng.integers(SEGMENTS[0], SEGMENTS[1] + 1))
        centre_M2 = rng.uniform(0, crop, (m, 2)).astype(np.float32)
        # Weighted (power) distances: some regions spread over their neighbours, so sizes vary as objects' do.
        reach_M = (rng.exponential(0.05, m) * crop * crop).astype(np.float32)
        dist_MHW = ((yy_HW - centre_M2[:, 0, None, None]) ** 2 + (xx_HW - centre_M2[:, 1, None, None]) ** 2
                    - reach_M[:, None, None])
        out_BHW[b] = rng.choice(len(share_C), m, p=share_C).astype(np.uint8)[dist_MHW.argmin(0)]
    return out_BHW


@dataclass
class Dictionary:
    """The directions the synthetic tokens are made of, shared by both splits, the SAE and the probe."""

    mean_D: torch.Tensor
    class_dirs_CD: torch.Tensor  # [151, D], row 0 (other) zero
    sae: Sae
    class_latent_C: np.ndarray  # [151] the latent planted for each class (-1 for other)
    texture_F: torch.Tensor  # the other latents: the texture features every token is made of
    popularity_F: np.ndarray


def dictionary(shape: Shape) -> Dictionary:
    """A TopK SAE that needs no training: its decoder rows are the tokens' own texture features, plus one noisy copy
    of each class direction, its encoder is its decoder transposed; so each class's latent fires on that class."""
    rng = np.random.default_rng([shape.seed, 1])
    D, S = shape.d_model, shape.d_sae
    mean_D = torch.from_numpy(rng.standard_normal(D).astype(np.float32))
    class_dirs_CD = F.normalize(torch.from_numpy(rng.standard_normal((N_CLASSES + 1, D)).astype(np.float32)), dim=1)
    class_dirs_CD[0] = 0
    sae = Sae.initialized(SaeSpec("topk", D, S, shape.k), mean_D, seed=shape.seed)
    latents = rng.permutation(S)
    class_latent_C = np.concatenate([[-1], latents[:N_CLASSES]])
    noise_CD = F.normalize(torch.from_numpy(rng.standard_normal((N_CLASSES, D)).astype(np.float32)), dim=1)
    row_noise_C1 = torch.from_numpy(rng.uniform(*ROW_NOISE, (N_CLASSES, 1)).astype(np.float32))
    rows_CD = F.normalize(class_dirs_CD[1:] + row_noise_C1 * noise_CD, dim=1)
    with torch.no_grad():
        sae.W_dec_SD[class_latent_C[1:]] = rows_CD
        sae.W_enc_SD[class_latent_C[1:]] = rows_CD
        sae.b_enc_S[class_latent_C[1:]] = -CLASS_THRESHOLD
    # A few texture features are far more common than the rest, as in real SAEs (some dense, most rare).
    popularity_F = rng.pareto(1.5, S - N_CLASSES) + 1.0
    return Dictionary(mean_D, class_dirs_CD, sae, class_latent_C, torch.from_numpy(latents[N_CLASSES:]),
                      popularity_F / popularity_F.sum())


def token_activations(rng: np.random.Generator, pixels_BHW: np.ndarray, d: Dictionary, shape: Shape) -> np.ndarray:
    """[B, P, D]: mean + CLASS_WEIGHT x strength x (the patch's pixel shares . class directions) + k - 1 texture
    features + noise. A mixed patch carries each of its classes in proportion, as a ViT's patch token roughly does."""
    shares_NC = torch.from_numpy(pixel_share_targets(pixels_BHW, shape.grid))
    N, D = len(shares_NC), shape.d_model
    features_NK = torch.from_numpy(rng.choice(len(d.popularity_F), (N, shape.k - 1), p=d.popularity_F))
    weights_NK = torch.from_numpy(rng.exponential(TEXTURE_WEIGHT, (N, shape.k - 1)).astype(np.float32))
    texture_ND = F.embedding_bag(d.texture_F[features_NK], d.sae.W_dec_SD.detach(), per_sample_weights=weights_NK,
                                 mode="sum")
    noise_ND = torch.from_numpy(rng.standard_normal((N, D), dtype=np.float32)) * (NOISE / math.sqrt(D))
    strength_N1 = torch.from_numpy(rng.uniform(*STRENGTH, (N, 1)).astype(np.float32))
    acts_ND = d.mean_D + CLASS_WEIGHT * strength_N1 * (shares_NC @ d.class_dirs_CD) + texture_ND + noise_ND
    return acts_ND.reshape(len(pixels_BHW), -1, D).numpy()


def write_split(folder: Path, split: str, n_images: int, d: Dictionary, shape: Shape, key: str) -> None:
    settings = CacheProvenance(backbone="synthetic (DINOv2 ViT-B/14 shape)", backbone_source="benchmarks/real_scale.py",
                             layer=10, crop_size=shape.crop, patch_size=shape.patch, d_model=shape.d_model,
                             dataset_root=f"synthetic:real_scale:{key}", split=split,
                             preprocessing=f"synthetic, inputs version {INPUTS_VERSION}")
    ids = [f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}" for i in range(n_images)]
    writer = CacheWriter(folder / CACHE_FOLDER, settings, ids, shape.chunk_images)
    rng, share_C = np.random.default_rng([shape.seed, 2, split == "training"]), pixel_shares()
    for start in range(0, n_images, shape.chunk_images):
        pixels_BHW = label_maps(rng, min(shape.chunk_images, n_images - start), shape.crop, share_C)
        labels_Bhw, purity_Bhw = patch_labels(pixels_BHW, shape.patch)
        writer.write_chunk(start, token_activations(rng, pixels_BHW, d, shape), labels_Bhw, purity_Bhw, pixels_BHW)
    writer.finish()


def synthetic_probe(d: Dictionary, shape: Shape, train: ActivationCache) -> Probe:
    """A probe that reads the class directions, with a mild prior for frequent classes as a trained probe has; it
    holds out every training chunk, so the tuning codes cover all tuning images."""
    rng = np.random.default_rng([shape.seed, 3])
    noise_CD = torch.from_numpy(rng.standard_normal(d.class_dirs_CD.shape).astype(np.float32))
    weight_CD = PROBE_GAIN * (d.class_dirs_CD + 0.02 * noise_CD)
    weight_CD[0] = 0
    bias_C = -(weight_CD @ d.mean_D) + 0.5 * torch.from_numpy(np.log(np.maximum(pixel_shares(), 1e-6))).float()
    spans = [[a, min(a + train.chunk_images, train.n_images)] for a in range(0, train.n_images, train.chunk_images)]
    return Probe(weight_CD, bias_C, {"source": "synthetic (benchmarks/real_scale.py)", "held_out_images": spans})


def remove_abandoned(folder: Path) -> None:
    """Removes what killed runs left in `folder` (named <key>-<pid>[-...]; the store's unfinished writes and this
    script's run folders): a few GB each at full size."""
    for path in folder.glob("*-*") if folder.is_dir() else ():
        pid = path.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            print(f"removing {path}, left by a run that ended before finishing")
            shutil.rmtree(path, ignore_errors=True)


def inputs(work: Path, shape: Shape) -> tuple[Path, bool]:
    """The folder of the synthetic caches, SAE and probe of `shape` (reused where complete), and whether it was."""
    constants = {"ratios": RATIO_ANCHORS, "segments": SEGMENTS, "class_weight": CLASS_WEIGHT, "strength": STRENGTH,
                 "texture_weight": TEXTURE_WEIGHT, "row_noise": ROW_NOISE, "class_threshold": CLASS_THRESHOLD,
                 "noise": NOISE, "probe_gain": PROBE_GAIN}
    store, spec = Store(work), OutputSpec("inputs", INPUTS_VERSION, {**asdict(shape), **constants})
    if store.exists("inputs", spec.key):
        return store.open("inputs", spec.key), True
    remove_abandoned(work / "inputs" / ".tmp")
    d = dictionary(shape)
    # Published by one rename once all is written: a killed run leaves nothing that looks complete.
    with store.write(spec) as folder:
        save_sae(d.sae, folder / "sae", {"source": "synthetic (benchmarks/real_scale.py)",
                                         "class_latents": d.class_latent_C.tolist()})
        write_split(folder / "train", "training", shape.tuning_images, d, shape, spec.key)
        write_split(folder / "val", "validation", shape.val_images, d, shape, spec.key)
        save_probe(folder / "probe", synthetic_probe(d, shape, ActivationCache(folder / "train" / CACHE_FOLDER)))
    return store.open("inputs", spec.key), False


# ---------------------------------------------------------------------------------------------------------------
# The stages, each in a fresh process as an asset's step; `paths` holds the inputs and the run's outputs


def cache(paths: dict, split: str) -> ActivationCache:
    return ActivationCache(paths["inputs"] / split / CACHE_FOLDER)


def stage_latent_stats(paths: dict, options: argparse.Namespace) -> dict:
    sae, _ = load_sae(paths["inputs"] / "sae")
    stats = compute_latent_stats(sae, cache(paths, "train"), StatsSettings(), options.device, log=lambda _: None)
    save_latent_stats(paths["latent_stats"], stats)
    return {"tokens": stats.n_tokens, "firing": int((stats.fire_count_S > 0).sum())}


def _codes(paths: dict, options: argparse.Namespace, split: str, out: str) -> dict:
    probe, images = load_probe(paths["inputs"] / "probe"), cache(paths, split)
    spans = tuning_spans(probe, images)[0] if split == "train" else None
    write_codes(paths[out], load_sae(paths["inputs"] / "sae")[0], probe, images, options.device, log=lambda _: None,
                spans=spans)
    codes = load_codes(paths[out])
    return {"tokens": codes.n_tokens, "codes_per_token": round(len(codes.values_M) / max(codes.n_tokens, 1), 1)}


def stage_val_codes(paths: dict, options: argparse.Namespace) -> dict:
    return _codes(paths, options, "val", "val_codes")


def stage_tuning_codes(paths: dict, options: argparse.Namespace) -> dict:
    return _codes(paths, options, "train", "tuning_codes")


def stage_class_latents(paths: dict, options: argparse.Namespace) -> dict:
    """Every class's chosen latents and rankings over every rule, as the class_latents asset chooses them."""
    stats = load_latent_stats(paths["latent_stats"])
    sae, meta = load_sae(paths["inputs"] / "sae")
    W_dec_SD, probe_W_CD = sae.W_dec_SD.detach().numpy(), load_probe(paths["inputs"] / "probe").weight_CD.numpy()
    selection, chosen = SelectionSettings(), {}
    for c in range(1, N_CLASSES + 1):
        effect_S = margin_effects(W_dec_SD, probe_W_CD, stats.class_patches_C > 0, c)
        pick = select_class_latents(stats, c, selection, margin_effect_S=effect_S)
        rankings = {rule: select_class_latents(stats, c, selection, rule, selection.ranked, effect_S).latents
                    for rule in RULES}
        chosen[c] = {"rule": pick.rule, "latents": pick.latents, "scores": pick.scores, "rankings": rankings,
                     "top_f1": pick.details[0]["pure_f1"] if pick.details else None}
    (paths["run"] / "class_latents.json").write_text(json.dumps(chosen))
    planted, with_latents = meta["class_latents"], [c for c in chosen if chosen[c]["latents"]]
    top_f1 = [chosen[c]["top_f1"] for c in with_latents]
    return {"with_latents": len(with_latents),
            "top_is_planted": sum(chosen[c]["latents"][0] == planted[c] for c in with_latents),
            "median_top_f1": round(float(np.median(top_f1)), 3) if top_f1 else None,
            "top_f1": {class_by_index(c).key: round(chosen[c]["top_f1"], 3) for c in (1, 10, 50, 150)
                       if chosen[c]["top_f1"] is not None}}


def _models(paths: dict) -> tuple:
    """Validation codes with pixels and tuning codes without, as assets/reports.py loads them."""
    folder = paths["inputs"]
    model = load_model(folder / "sae", folder / "probe", paths["latent_stats"], paths["val_codes"], cache(paths, "val"))
    tuning = load_model(folder / "sae", folder / "probe", paths["latent_stats"], paths["tuning_codes"],
                        cache(paths, "train"), pixel=False)
    return model, tuning


def stage_study_models(paths: dict, options: argparse.Namespace) -> dict:
    model, tuning = _models(paths)
    return {"val_images": model.n_images, "tuning_images": tuning.n_images}


def stage_class_study(paths: dict, options: argparse.Namespace) -> dict:
    """The sampled classes' studies on models loaded once (their loading is the study_models stage's figure), in
    --workers processes side by side as the suppression_report asset runs them."""
    t0 = time.perf_counter()
    model, tuning = _models(paths)
    models_s = time.perf_counter() - t0
    chosen = json.loads((paths["run"] / "class_latents.json").read_text())
    classes = [c for c, _ in sampled_classes(options.classes)]
    jobs = [(c, Selection(chosen[str(c)]["rule"], tuple(chosen[str(c)]["latents"]), tuple(chosen[str(c)]["scores"])),
             {rule: tuple(r) for rule, r in chosen[str(c)]["rankings"].items()}) for c in classes]
    seconds, outcome = {}, {}
    t0 = time.perf_counter()
    for c, (report, s) in zip(classes, study_classes(model, tuning, jobs, SuppressionSettings(), options.workers)):
        seconds[c] = s
        outcome[c] = report.status + (f", target change {report.configured.patch.target_change_rate:.2f}, other "
                                      f"{report.configured.patch.other_change_rate:.3f}, specific {report.specific}"
                                      if report.configured is not None else "")
    wall = time.perf_counter() - t0
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"models_loaded_s": round(models_s, 1), "classes": len(seconds), "per_class": seconds, "outcome": outcome,
            "wall_s": wall, "workers": min(options.workers, len(jobs)), "workers_peak_rss_gb": workers_peak}


def stage_imports(paths: dict, options: argparse.Namespace) -> dict:
    """Nothing: what a stage's process holds before its work (Python, torch, the project)."""
    return {}


def stage_inputs(paths: dict, options: argparse.Namespace) -> dict:
    folder, reused = inputs(paths["work"], shape_of(options))
    return {"folder": str(folder), "reused": reused}


STAGES = {"imports": stage_imports, "latent_stats": stage_latent_stats, "val_codes": stage_val_codes,
          "tuning_codes": stage_tuning_codes, "class_latents": stage_class_latents, "study_models": stage_study_models,
          "class_study": stage_class_study}


def sampled_classes(n: int) -> list[tuple[int, int]]:
    """(class, how many classes it stands for): n strata of consecutive pixel-share ranks (ADE20K's numbering), each
    represented by its middle class, so frequent and rare classes are both sampled."""
    edges = np.linspace(0, N_CLASSES, min(n, N_CLASSES) + 1).round().astype(int)
    return [(int(a + b) // 2 + 1, int(b - a)) for a, b in zip(edges[:-1], edges[1:])]


def peak_rss_gb() -> float:
    """This process's peak resident memory since its exec (VmHWM). Not ru_maxrss: a spawned child's ru_maxrss starts
    at its parent's resident memory at the fork."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 2**20


def _child(conn, stage, paths: dict, options: argparse.Namespace) -> None:
    try:
        if options.threads:
            torch.set_num_threads(options.threads)
        t0 = time.perf_counter()
        summary = stage(paths, options)
        seconds = time.perf_counter() - t0
        gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else None
        peak = peak_rss_gb()
        device = torch.cuda.get_device_name() if torch.cuda.is_initialized() else "cpu"
        conn.send({"seconds": seconds, "peak_rss_gb": peak, "gpu_peak_gb": gpu, "summary": summary,
                   "device": device, "threads": torch.get_num_threads()})
    except BaseException:
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def run_stage(stage, paths: dict, options: argparse.Namespace) -> dict:
    """Runs one stage function in a spawned process (nothing carried over from this one); its time and peak."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, stage, paths, options))
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = {"error": "the process died without a word (killed for memory?)"}
    process.join()
    if "error" in result:
        raise SystemExit(f"stage {stage.__name__} failed (exit {process.exitcode}):\n{result['error']}")
    return result


EPILOG = """\
The synthetic data. Label maps of 3-14 regions each (a power diagram), each region's label drawn by objectInfo150's
pixel shares (wall 16% of pixels, flag 0.02%); patch labels and purity derived from them as the recording does.
Each token = mean + 4 x strength (0.25..1.25) x (its pixel shares . the class directions) + k - 1 texture features
+ noise. The SAE is built, not trained: its decoder rows are the texture features plus one noisy copy of each class
direction (cos 0.86..0.98), its encoder the decoder transposed, with a negative bias on the class latents; so each
class has a latent that fires on its patches, crisp or poor. The probe reads the class directions, with a mild
prior for frequent classes. The inputs are written once under --work/inputs/<key of the sizes and seed>/ and reused;
each run's stage outputs go to --work/runs/ and are removed at the end (unless --keep).
"""


def shape_of(options: argparse.Namespace) -> Shape:
    return Shape(options.val_images, options.tuning_images, options.d_model, options.d_sae, options.k, options.crop,
                 options.patch, options.seed)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG)
    size = parser.add_argument_group("sizes (defaults: ADE20K through DINOv2 ViT-B/14, SAE of 24,576 latents)")
    size.add_argument("--val-images", type=int, default=2000, help="validation images (ADE20K: 2,000)")
    size.add_argument("--tuning-images", type=int, default=4000,
                      help="training images, all of them the study's tuning split (ADE20K's 20%% held out: ~4,000)")
    size.add_argument("--d-model", type=int, default=768, help="activation width (ViT-B/14: 768)")
    size.add_argument("--d-sae", type=int, default=24576, help="SAE latents (the released SAE: 24,576)")
    size.add_argument("--k", type=int, default=64, help="TopK latents per token")
    size.add_argument("--crop", type=int, default=224, help="crop size in pixels")
    size.add_argument("--patch", type=int, default=14, help="patch size in pixels (224 / 14: 16 x 16 tokens)")
    parser.add_argument("--classes", type=int, default=10,
                        help="classes studied, one per stratum of pixel-share ranks; the 150 are estimated from them")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where latent_stats and the codes run (the study runs on the CPU, in --workers processes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per stage (0: torch's default)")
    parser.add_argument("--workers", type=int, default=machine_cores(),
                        help="processes studying classes side by side (SAESEG_CLASS_WORKERS; default: the cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs (part of their key)")
    parser.add_argument("--work", default="data/benchmarks/real_scale",
                        help="where the synthetic inputs are kept (full size: about 2.7 GB, 2.2 GB more during a run)")
    parser.add_argument("--keep", action="store_true", help="keep this run's stage outputs (codes, statistics)")
    parser.add_argument("--reuse", metavar="RUN", help="a run folder kept by --keep (same sizes and seed): its latent "
                        "statistics, codes and class latents are reused and only the study's stages run")
    options = parser.parse_args()
    shape = shape_of(options)
    if shape.d_sae < 2 * N_CLASSES or not 1 < shape.k <= shape.d_sae or shape.crop % shape.patch:
        raise SystemExit(f"--d-sae must be >= {2 * N_CLASSES}, --k in 2..d_sae, --crop a multiple of --patch")
    if options.classes < 1:
        raise SystemExit("--classes must be >= 1")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")

    work = Path(options.work)
    made = run_stage(stage_inputs, {"work": work}, options)
    folder = Path(made["summary"]["folder"])
    print(f"synthetic inputs {'reused' if made['summary']['reused'] else 'written'} in {made['seconds']:.1f} s, "
          f"peak RSS {made['peak_rss_gb']:.2f} GB: {folder} ({shape.val_images} validation + {shape.tuning_images} "
          f"training images, {shape.grid ** 2} patches x {shape.d_model}; TopK SAE {shape.d_sae} latents, k {shape.k})",
          flush=True)
    remove_abandoned(work / "runs")
    run = Path(options.reuse) if options.reuse else work / "runs" / f"{folder.name}-{os.getpid()}"
    stages = STAGES
    if options.reuse:
        if not run.name.startswith(folder.name) or not (run / "class_latents.json").is_file():
            raise SystemExit(f"--reuse {run}: not a complete run kept by --keep for these inputs ({folder.name})")
        stages = {name: STAGES[name] for name in ("imports", "study_models", "class_study")}
    run.mkdir(parents=True, exist_ok=True)
    paths = {"inputs": folder, "run": run, **{name: run / name for name in ("latent_stats", "val_codes",
                                                                           "tuning_codes")}}
    results = {}
    try:
        for stage, function in stages.items():
            results[stage] = result = run_stage(function, paths, options)
            gpu = f"   GPU peak {result['gpu_peak_gb']:5.2f} GB" if result["gpu_peak_gb"] is not None else ""
            shown = {k: v for k, v in result["summary"].items() if k not in ("per_class", "outcome")}
            print(f"{stage:14s} {result['seconds']:8.1f} s   peak RSS {result['peak_rss_gb']:5.2f} GB{gpu}   "
                  f"{json.dumps(shown) if shown else ''}", flush=True)
    finally:
        if options.keep or options.reuse:
            print(f"this run's stage outputs are kept in {run}")
        else:
            shutil.rmtree(run, ignore_errors=True)

    study = results.pop("class_study")
    floor = results.pop("imports")["peak_rss_gb"]
    per_class = {int(c): s for c, s in study["summary"]["per_class"].items()}
    strata = sampled_classes(options.classes)
    for c, stands_for in strata:
        print(f"  {class_by_index(c).key:22s} {per_class[c]:7.2f} s  (stands for {stands_for} classes)  "
              f"{study['summary']['outcome'][c]}")
    summary = study["summary"]
    busy_s = sum(per_class.values())
    # Side by side, the workers got through busy_s of studies in wall_s: that rate scales the stratified sum.
    speedup = busy_s / summary["wall_s"]
    all_s = sum(per_class[c] * n for c, n in strata) / speedup
    mean_s = all_s / N_CLASSES
    print(f"class study: {busy_s / len(per_class):.2f} s per sampled class in one worker (mean of {len(per_class)}); "
          f"{summary['workers']} workers side by side did them {speedup:.2f}x faster than one after another; all "
          f"{N_CLASSES} classes {all_s:.0f} s (each sampled class's time x the classes of its stratum / {speedup:.2f}),"
          f" {mean_s:.2f} s per class. The study's process peaked at {study['peak_rss_gb']:.2f} GB with both models "
          f"loaded, its largest worker at {summary['workers_peak_rss_gb']:.2f} GB (pages shared with it included)")
    if "latent_stats" in results:
        stats_s = results["latent_stats"]["seconds"]
        print(f"latent_stats read {shape.tuning_images} training images; the real pipeline reads all "
              f"{REAL_TRAINING_IMAGES:,}: about {stats_s * REAL_TRAINING_IMAGES / shape.tuning_images:.0f} s at this "
              "d_sae (linear in images).")
    print(f"A stage process's floor (imports alone) is {floor:.2f} GB of the peaks above; torch threads "
          f"{study['threads']} (each class study runs on one, as in the pipeline). Wall clock: a shared machine's "
          "figures move with its load.")
    device = results.get("latent_stats", study)["device"]
    seconds = {stage: round(r["seconds"], 2) for stage, r in results.items()}
    print(json.dumps({"device": device if options.device == "cuda" else "cpu", "cores": len(os.sched_getaffinity(0)),
                      "val_images": shape.val_images, "tuning_images": shape.tuning_images,
                      "d_model": shape.d_model, "d_sae": shape.d_sae, "k": shape.k, "seconds": seconds,
                      "per_class_s": round(mean_s, 3), "all_classes_s": round(all_s, 1),
                      "workers": summary["workers"],
                      "peak_rss_gb": round(max(summary["workers_peak_rss_gb"],
                                               *(r["peak_rss_gb"] for r in [*results.values(), study])), 2)}))


if __name__ == "__main__":
    main()
