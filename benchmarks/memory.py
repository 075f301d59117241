"""Memory and time against the amount of data: the pipeline's own assets on caches of the demo's shape holding 1x and
8x its tokens, each asset run by the CLI in a fresh process, as `make demo` runs it.

The 8x caches are the demo's caches repeated eight times, every copy after the first with its own seeded noise (10% of
each dimension's spread), over a dataset folder of links to the demo's images under new names; so the images, labels
and shapes are the demo's and only the amount grows. For each asset it prints peak resident memory (the process's
maximum RSS, Dagster and torch included) and the step's own time at both sizes, then the ratios 8x / 1x (targets: memory
<= 1.3, time <= 9). The SAE trains a fixed number of tokens, so its time should not grow at all.
Needs the demo's output (`make demo`). Takes about 15 minutes on 2 cores.
Usage: python benchmarks/memory.py [--data data] [--scale 8] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from saeseg_assets.core.data.cache import CACHE_FOLDER, ActivationCache, CacheWriter
from saeseg_assets.core.store.artifacts import OutputSpec, Store

# In pipeline order; the first ones only put inputs in place for those measured.
STAGES = [
    ("sae_weights", []),
    ("probe_checkpoint", []),
    ("baseline_metrics", []),
    ("latent_stats", []),
    ("val_codes", []),
    ("tuning_codes", []),
    ("class_latents", ["--partition-range", "001_wall...150_flag"]),
    ("suppression_report", ["--partition-range", "001_wall...150_flag"]),
]
MEASURED = ["sae_weights", "probe_checkpoint", "latent_stats", "val_codes", "suppression_report"]
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})
FIELDS = ("activations", "patch_labels", "patch_purity", "pixel_labels")
STEP_TIME = re.compile(r'Finished execution of step "(\w+)" in ([0-9.]+)(ms|s|m)')


def scaled_dataset(source_root: Path, ids: dict[str, list[str]], scale: int, root: Path) -> Path:
    """An ADE20K-format folder whose split holds `scale` linked copies of each demo pair, named <id>_r<copy>."""
    dataset = root / "ADEChallengeData2016"
    for split, split_ids in ids.items():
        for kind, suffix in (("images", ".jpg"), ("annotations", ".png")):
            folder = dataset / kind / split
            folder.mkdir(parents=True)
            for image_id in split_ids:
                target = source_root / kind / split / f"{image_id}{suffix}"
                for r in range(scale):
                    (folder / f"{image_id}_r{r}{suffix}").symlink_to(target)
    return dataset


def write_scaled_cache(source: ActivationCache, scale: int, dataset: Path, folder: Path, seed: int) -> None:
    """The source cache repeated `scale` times, in the order of the linked dataset's ids (<id>_r<copy>), every copy
    after the first with its own noise."""
    n, chunk = source.n_images, source.chunk_images
    arrays = {name: source.read(name, 0, n) for name in FIELDS}
    spread_D = arrays["activations"].astype(np.float32).reshape(-1, source.d_model).std(0)
    ids = source.image_ids()
    order = sorted((f"{image_id}_r{r}", r, i) for r in range(scale) for i, image_id in enumerate(ids))
    settings = replace(source.settings, dataset_root=str(dataset),
                       preprocessing=f"{source.settings.preprocessing}; x{scale} (benchmarks/memory.py)")
    writer = CacheWriter(folder / CACHE_FOLDER, settings, [name for name, _, _ in order], chunk)
    rng = np.random.default_rng(seed)
    for start in range(0, len(order), chunk):
        block = order[start:start + chunk]
        rows = [i for _, _, i in block]
        acts = arrays["activations"][rows].astype(np.float32)
        for j, (_, r, _) in enumerate(block):
            if r:
                acts[j] += 0.1 * spread_D * rng.standard_normal(acts[j].shape, dtype=np.float32)
        writer.write_chunk(start, acts, arrays["patch_labels"][rows], arrays["patch_purity"][rows],
                           arrays["pixel_labels"][rows])
    writer.finish({"seconds": source.attrs.get("seconds", 0.0)})


def prepare(data: Path, scale: int, root: Path) -> dict[str, str]:
    """A data folder and a Dagster home under `root` whose latest caches are the demo's at `scale` x; returns the
    environment for the CLI."""
    import dagster as dg

    store = Store(root / "data")
    sources = {asset: ActivationCache(Store(data).newest(asset) / CACHE_FOLDER)
               for asset in ("train_activations", "val_activations")}
    source_root = Path(sources["train_activations"].attrs["dataset_root"])
    ids = {cache.attrs["split"]: cache.image_ids() for cache in sources.values()}
    dataset = scaled_dataset(source_root, ids, scale, root / "dataset")
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = dg.DagsterInstance.from_config(str(home))
    for seed, (asset, source) in enumerate(sources.items()):
        spec = OutputSpec(asset, 1, {"benchmark": {"source": source.fingerprint, "scale": scale}})
        with store.write(spec) as folder:
            write_scaled_cache(source, scale, dataset, folder, seed)
        instance.report_runless_asset_event(dg.AssetMaterialization(asset, metadata={"key": spec.key}))
    instance.dispose()
    return {**os.environ, "DAGSTER_HOME": str(home), "SAESEG_DATA": str(root / "data"),
            "SAESEG_ADE20K_ROOT": str(dataset)}


def run_stage(asset: str, extra: list[str], env: dict[str, str], log: Path) -> tuple[float, float, float]:
    """Materializes one asset in a fresh process: (peak RSS in MiB, the step's seconds, the process's seconds)."""
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "saeseg_assets", "--select", asset,
               "--config-json", IN_PROCESS, *extra]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # wait4: this child's own peak RSS
    wall = time.perf_counter() - t0
    process.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
    if code:
        raise SystemExit(f"{asset} failed (exit {code}); its log: {log}")
    steps = [(m[1], float(m[2]) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[m[3]]) for m in STEP_TIME.finditer(log.read_text())]
    step = sum(seconds for name, seconds in steps if name == asset)
    return usage.ru_maxrss / 1024, step, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="the demo's data folder (default: data)")
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--work", default="", help="where the scaled copies go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="saeseg-memory-"))
    results: dict[int, dict[str, tuple[float, float, float]]] = {}
    try:
        for scale in (1, args.scale):
            root = work / f"x{scale}"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            t0 = time.perf_counter()
            env = prepare(Path(args.data), scale, root)
            cache = ActivationCache(Store(root / "data").newest("train_activations") / CACHE_FOLDER)
            print(f"[{scale}x] caches written in {time.perf_counter() - t0:.0f} s: training {cache.n_tokens:,} tokens",
                  flush=True)
            results[scale] = {}
            for asset, extra in STAGES:
                results[scale][asset] = run_stage(asset, extra, env, root / f"{asset}.log")
                peak, step, wall = results[scale][asset]
                print(f"[{scale}x] {asset:20s} peak RSS {peak:7.0f} MiB   step {step:7.1f} s   process {wall:6.1f} s",
                      flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    big = args.scale
    print(f"\n{'asset':20s} {'peak 1x':>9s} {'peak ' + str(big) + 'x':>9s} {'memory':>7s} {'step 1x':>8s} "
          f"{'step ' + str(big) + 'x':>8s} {'time':>6s}")
    for asset in MEASURED:
        (p1, s1, _), (p8, s8, _) = results[1][asset], results[big][asset]
        print(f"{asset:20s} {p1:8.0f}M {p8:8.0f}M {p8 / p1:7.2f} {s1:7.1f}s {s8:7.1f}s {s8 / s1:6.2f}")
    worst_memory = max(results[big][a][0] / results[1][a][0] for a in MEASURED)
    worst_time = max(results[big][a][1] / results[1][a][1] for a in MEASURED)
    print(f"\nworst ratios at {big}x the tokens: peak memory {worst_memory:.2f} (target <= 1.3), "
          f"time {worst_time:.2f} (target <= 9)")


if __name__ == "__main__":
    main()
