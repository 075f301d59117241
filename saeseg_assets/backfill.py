"""`python -m saeseg_assets.backfill --select ASSETS --partition-range FIRST...LAST [--wait]`: hands a backfill of
class assets to the daemon, as "Materialize… > All" in the UI does; it splits the classes into runs by the assets'
backfill policy (SAESEG_CLASSES_PER_RUN), which the daemon's queue starts side by side."""

from __future__ import annotations

import argparse
import secrets
import string
import sys
import time

import dagster as dg

# Dagster has no public call that records an asset backfill, or names its states, outside the UI and its GraphQL API
# (which need a running webserver): this is the object they record. test_dagster_internals.py fails, naming what
# changed, if Dagster changes it.
from dagster._core.execution.backfill import BULK_ACTION_TERMINAL_STATUSES, BulkActionStatus, PartitionBackfill


def submit_backfill(instance: dg.DagsterInstance, asset_graph, assets: list[str], partitions: list[str],
                    title: str | None = None) -> str:
    """Records a backfill of `partitions` of `assets` in the instance (its daemon launches the runs); its id."""
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=new_backfill_id(), asset_graph=asset_graph, partition_names=partitions,
        asset_selection=[dg.AssetKey.from_user_string(a) for a in assets], backfill_timestamp=time.time(),
        tags={}, dynamic_partitions_store=instance, all_partitions=False, title=title, description=None,
        run_config=None)
    instance.add_backfill(backfill)
    return backfill.backfill_id


def new_backfill_id() -> str:
    """Eight random lower-case letters, as the UI's backfill ids."""
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(8))


def wait_for_backfill(instance: dg.DagsterInstance, backfill_id: str, timeout_s: float, poll_s: float = 1.0):
    """Waits until the backfill and all its runs have ended; the backfill's last state."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        backfill = instance.get_backfill(backfill_id)
        if backfill.status in BULK_ACTION_TERMINAL_STATUSES:
            if all(run.is_finished for run in instance.get_runs(dg.RunsFilter.for_backfill(backfill_id))):
                return backfill
        time.sleep(poll_s)
    raise TimeoutError(f"backfill {backfill_id} still running after {timeout_s:.0f} s")


def partition_range(partitions_def: dg.PartitionsDefinition, spec: str) -> list[str]:
    """The keys from FIRST to LAST of `FIRST...LAST`, both included, in the definition's order."""
    first, sep, last = spec.partition("...")
    keys = list(partitions_def.get_partition_keys())
    if not sep or first not in keys or last not in keys or keys.index(first) > keys.index(last):
        raise ValueError(f"--partition-range {spec!r}: expected FIRST...LAST, two class keys in order "
                         f"({keys[0]}...{keys[-1]} for all)")
    return keys[keys.index(first): keys.index(last) + 1]


def main(argv: list[str] | None = None) -> int:
    from . import defs
    from .partitions import class_partitions

    parser = argparse.ArgumentParser(prog="python -m saeseg_assets.backfill", description=__doc__)
    parser.add_argument("--select", required=True, help="comma-separated assets, e.g. class_latents,suppression_report")
    parser.add_argument("--partition-range", required=True, help="FIRST...LAST, e.g. 001_wall...150_flag")
    parser.add_argument("--wait", action="store_true", help="wait until the backfill and its runs have ended")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait at most (with --wait)")
    args = parser.parse_args(argv)
    partitions = partition_range(class_partitions, args.partition_range)
    with dg.DagsterInstance.get() as instance:
        backfill_id = submit_backfill(instance, defs.resolve_asset_graph(), args.select.split(","), partitions)
        print(f"backfill {backfill_id}: {len(partitions)} classes of {args.select}; the daemon launches its runs")
        if not args.wait:
            return 0
        start = time.time()
        backfill = wait_for_backfill(instance, backfill_id, args.timeout)
        runs = instance.get_runs(dg.RunsFilter.for_backfill(backfill_id))
        failed = [run.run_id for run in runs if run.status != dg.DagsterRunStatus.SUCCESS]
        print(f"backfill {backfill_id}: {backfill.status.value} after {time.time() - start:.1f} s, {len(runs)} run(s)"
              + (f", failed: {' '.join(failed)}" if failed else ""))
        return 1 if failed or backfill.status != BulkActionStatus.COMPLETED_SUCCESS else 0


if __name__ == "__main__":
    sys.exit(main())
