"""The 150 classes of class_latents + suppression_report as one backfill through the daemon, on the PostgreSQL
instance of deploy/postgres/dagster.yaml (at most 3 runs at once): all in one run against 5 runs of 30, side by side.

Tiny data (the tests' dataset, random ViT and imported checkpoints) through the real pipeline code, so the figures
show the cost of the runs themselves (processes, imports, loading the shared inputs once per run), not of the science.
Prints, per setting, the time from submitting the backfill to the end of its last run, and the runs' own span.
Usage: python benchmarks/concurrent_backfill.py [--per-run 30] [--rounds 1]   (needs Debian's postgresql package)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from saeseg_assets_tests.postgres import PostgresServer, find_bin
from saeseg_assets_tests.test_postgres import (
    CLASSES,
    backfill_runs,
    clone_world,
    make_template_world,
    wait_for_runs,
)


def timed_backfill(world) -> tuple[float, float, int]:
    """(submission to last run's end, first run's start to last run's end, runs) of one backfill of all classes."""
    started = time.time()
    backfill_id = world.backfill(CLASSES[0], CLASSES[-1])
    with world.daemon(), world.instance() as instance:
        n_runs = -(-len(CLASSES) // int(world.env.get("SAESEG_CLASSES_PER_RUN") or len(CLASSES)))
        records = wait_for_runs(world, instance, backfill_id, n_runs, 3600)
        assert all(r.dagster_run.is_success for r in records), world.log()
        ended = max(r.end_time for r in records)
        span = ended - min(r.start_time for r in backfill_runs(instance, backfill_id))
    return ended - started, span, len(records)


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
            template = make_template_world(server, root / "template")
            print(f"{os.cpu_count()} CPUs; {len(CLASSES)} classes; at most 3 runs at once")
            results: dict[str, list[tuple[float, float, int]]] = {"one run": [], f"runs of {args.per_run}": []}
            for i in range(args.rounds):
                for label, per_run in (("one run", ""), (f"runs of {args.per_run}", args.per_run)):
                    world = clone_world(template, server, root / f"{i}_{per_run or 'all'}",
                                        SAESEG_CLASSES_PER_RUN=per_run)
                    results[label].append(timed_backfill(world))
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
