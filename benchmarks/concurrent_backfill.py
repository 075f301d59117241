"""The 150 classes of class_latents + suppression_report as one backfill through the daemon, on the PostgreSQL
instance of deploy/postgres/dagster.yaml (at most 3 runs at once): all in one run against 5 runs of 30, side by side.

Tiny data (six images of the embedded demo, a random 2-layer ViT, a ReLU SAE of 64 latents trained on them, a random
probe imported) through the real pipeline code, so the figures show the cost of the runs themselves (processes,
imports, loading the shared inputs once per run), not of the science. The daemon serves the project's definitions,
as deployed. Prints, per setting, the time from submitting the backfill to the end of its last run, and the runs'
own span.
Usage: python benchmarks/concurrent_backfill.py [--per-run 30] [--rounds 1]   (needs Debian's postgresql package)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
from postgres_server import PostgresServer, find_bin

from saeseg_assets.backfill import wait_for_backfill
from saeseg_assets.partitions import class_partitions

BIN = Path(sys.executable).parent
DEPLOY_YAML = Path(__file__).resolve().parents[1] / "deploy" / "postgres" / "dagster.yaml"
CLASSES = list(class_partitions.get_partition_keys())
CLASSWISE = "class_latents,suppression_report"
TEMPLATE_DATABASE = "world"


def world_env(server: PostgresServer, database: str, root: Path, **settings: str) -> dict[str, str]:
    """A DAGSTER_HOME with the deploy instance on `database` and a data folder, both under `root`."""
    home = root / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(DEPLOY_YAML, home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAESEG_", "DAGSTER_"))}
    # One torch thread per step process: the runs side by side share the cores. The sensors look once, at the
    # daemon's start: their ticks are not what is measured.
    return {**env, **server.env(database), "DAGSTER_HOME": str(home), "SAESEG_DATA": str(root / "data"),
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SAESEG_SENSOR_INTERVAL_S": "86400", **settings}


def template_world(server: PostgresServer, root: Path) -> dict[str, str]:
    """The tiny data, and every unpartitioned asset above the class reports materialized (the CLI, one process)
    in the database TEMPLATE_DATABASE; its environment. The probe is imported: its sweep holds out a whole chunk of
    training images, more than four."""
    import torch
    import transformers

    from saeseg_assets import defs
    from saeseg_assets.core.data.demo_data import write_demo_dataset
    from saeseg_assets.core.probe.model import Probe, save_probe

    torch.manual_seed(0)
    vit = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=14, image_size=28)
    transformers.Dinov2Model(vit).save_pretrained(root / "vit")
    save_probe(root / "probe", Probe(torch.randn(151, vit.hidden_size), torch.zeros(151), {"source": "random"}))
    env = world_env(server, server.create_database(TEMPLATE_DATABASE), root,
                    SAESEG_ADE20K_ROOT=str(write_demo_dataset(root / "ade", n_train=4, n_val=2)),
                    SAESEG_BACKBONE=str(root / "vit"), SAESEG_PROBE_CHECKPOINT=str(root / "probe"))
    graph = defs.resolve_asset_graph()
    shared = [k.to_user_string() for k in dg.AssetSelection.assets("suppression_report").upstream().resolve(graph)
              if graph.get(k).partitions_def is None]
    config = {"execution": {"config": {"in_process": {}}},
              "ops": {"sae_weights": {"config": {"architecture": "relu", "expansion": 2}}}}
    run([str(BIN / "dagster"), "asset", "materialize", "-m", "saeseg_assets", "--select", ",".join(shared),
         "--config-json", json.dumps(config)], env, root)
    return env


def run(command: list[str], env: dict[str, str], cwd: Path) -> str:
    """What `command` prints; its error output if it fails."""
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def clone_world(template: dict[str, str], server: PostgresServer, root: Path, **settings: str) -> dict[str, str]:
    """A copy of the template's database (CREATE DATABASE ... TEMPLATE) and data folder: no class made yet. Store keys
    do not depend on the data folder, so the copy finds the shared outputs."""
    env = world_env(server, server.create_database(f"w{time.time_ns()}", template=TEMPLATE_DATABASE), root,
                    **{k: v for k, v in template.items() if k.startswith("SAESEG_") and k != "SAESEG_DATA"},
                    **settings)
    shutil.copytree(template["SAESEG_DATA"], env["SAESEG_DATA"], symlinks=True)
    return env


def timed_backfill(env: dict[str, str], root: Path) -> tuple[float, float, int]:
    """(submission to last run's end, first run's start to last run's end, runs) of one backfill of all classes."""
    started = time.time()
    # Submitted before the daemon starts: its first look starts the runs (later looks come every 30 s).
    submitted = run([sys.executable, "-m", "saeseg_assets.backfill", "--select", CLASSWISE,
                     "--partition-range", f"{CLASSES[0]}...{CLASSES[-1]}"], env, root)
    backfill_id = submitted.split()[1].rstrip(":")
    log = root / "daemon.log"
    with open(log, "w") as out:
        # A shell that starts this in the background ignores SIGINT, and children inherit that: restored.
        daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-m", "saeseg_assets"], env=env, cwd=root,
                                  stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # The instance's YAML reads its database from the environment when the instance is made.
        os.environ.update({k: v for k, v in env.items() if k.startswith("DAGSTER_PG_")})
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            wait_for_backfill(instance, backfill_id, 3600)
            records = list(instance.get_run_records(filters=dg.RunsFilter.for_backfill(backfill_id)))
    finally:
        daemon.send_signal(signal.SIGINT)  # Dagster's clean shutdown, which stops its code servers too
        daemon.wait(timeout=60)
    if failed := [r.dagster_run.run_id for r in records if not r.dagster_run.is_success]:
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            errors = [e.dagster_event.step_failure_data.error.to_string() for run_id in failed
                      for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)]
        raise SystemExit(f"backfill {backfill_id}: runs {' '.join(failed)} failed:\n" + "\n".join(errors)[-4000:])
    ended = max(r.end_time for r in records)
    return ended - started, ended - min(r.start_time for r in records), len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-run", default="30", help="classes per run in the concurrent setting")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    bin_dir = find_bin()
    if bin_dir is None:
        raise SystemExit("no PostgreSQL server binaries: apt-get install postgresql")
    server = PostgresServer(bin_dir).init()
    try:
        with tempfile.TemporaryDirectory(prefix="saeseg_backfill_") as tmp:
            root = Path(tmp)
            template = template_world(server, root / "template")
            print(f"{os.cpu_count()} CPUs; {len(CLASSES)} classes; at most 3 runs at once")
            results: dict[str, list[tuple[float, float, int]]] = {"one run": [], f"runs of {args.per_run}": []}
            for i in range(args.rounds):
                for label, per_run in (("one run", ""), (f"runs of {args.per_run}", args.per_run)):
                    world = root / f"{i}_{per_run or 'all'}"
                    env = clone_world(template, server, world, SAESEG_CLASSES_PER_RUN=per_run)
                    results[label].append(timed_backfill(env, world))
                    total, span, n = results[label][-1]
                    print(f"round {i + 1}, {label}: {n} run(s), {total:.1f} s from submission, runs span {span:.1f} s")
            best = {label: min(r[0] for r in runs) for label, runs in results.items()}
            (one, concurrent) = best.values()
            print(f"best of {args.rounds}: one run {one:.1f} s, {list(best)[1]} {concurrent:.1f} s, "
                  f"ratio {concurrent / one:.2f}")
    finally:
        server.close()


if __name__ == "__main__":
    main()
