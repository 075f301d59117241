"""The few Dagster internals the project relies on for want of a public equivalent, checked against the installed
Dagster: a failure says what changed and which module to fix (launcher, backfill, checks, staleness)."""

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from saeseg_assets.partitions import class_partitions

DAGSTER = Path(sys.executable).with_name("dagster")

pytestmark = [pytest.mark.filterwarnings("ignore::dagster.BetaWarning"),  # a backfill policy is in beta
              pytest.mark.filterwarnings("ignore:Function `AssetSelection.sources`:DeprecationWarning")]  # in Dagster


def internal(module: str, name: str, user: str):
    """`module.name` from Dagster, or a failure saying that `user` needs it and Dagster moved it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.fail(f"Dagster {dg.__version__} has no {module}.{name} any more; {user} imports it: find where it went "
                    "(or a public equivalent) and change the import there")


def test_a_materialization_keeps_its_data_version_in_the_tag_staleness_reads():
    from saeseg_assets.staleness import DATA_VERSION_TAG

    @dg.asset
    def versioned() -> dg.MaterializeResult:
        return dg.MaterializeResult(data_version=dg.DataVersion("v7"))

    with dg.instance_for_test() as instance:
        assert dg.materialize([versioned], instance=instance).success
        tags = instance.fetch_materializations(versioned.key, limit=1).records[0].asset_materialization.tags
    assert tags.get(DATA_VERSION_TAG) == "v7", (
        f"Dagster no longer records a materialization's data version in the tag {DATA_VERSION_TAG!r} (its tags: "
        f"{tags}): saeseg_assets/staleness.py reads it to tell whether an input changed")


def test_a_run_takes_its_range_of_partitions_from_the_tags_staleness_writes():
    from saeseg_assets.staleness import PARTITION_RANGE_TAGS

    seen = []

    @dg.asset(partitions_def=class_partitions, backfill_policy=dg.BackfillPolicy.single_run())
    def classwise(context: dg.AssetExecutionContext) -> None:
        seen.extend(context.partition_keys)

    tags = dict(zip(PARTITION_RANGE_TAGS, ("001_wall", "003_sky")))
    with dg.instance_for_test() as instance:
        assert dg.materialize([classwise], instance=instance, tags=tags).success
    assert seen == ["001_wall", "002_building", "003_sky"], (
        f"a run tagged {tags} no longer covers that range of partitions (it ran {seen}): "
        "saeseg_assets/staleness.py asks for one run per block of classes so")


def test_a_backfill_recorded_as_the_ui_does_is_requested_and_its_end_is_seen():
    backfill_module = "dagster._core.execution.backfill"
    user = "saeseg_assets/backfill.py"
    for name in ("PartitionBackfill", "BulkActionStatus", "BULK_ACTION_TERMINAL_STATUSES"):
        internal(backfill_module, name, user)
    from saeseg_assets.backfill import BulkActionStatus, submit_backfill, wait_for_backfill

    @dg.asset(partitions_def=class_partitions, backfill_policy=dg.BackfillPolicy.single_run())
    def classwise() -> None:
        pass

    graph = dg.Definitions(assets=[classwise]).resolve_asset_graph()
    with dg.instance_for_test() as instance:
        try:
            backfill_id = submit_backfill(instance, graph, ["classwise"], ["001_wall", "002_building"])
        except TypeError as error:
            pytest.fail(f"Dagster changed PartitionBackfill.from_asset_partitions ({error}): {user} records a "
                        "backfill with it")
        backfill = instance.get_backfill(backfill_id)
        assert backfill.status == BulkActionStatus.REQUESTED and list(backfill.asset_selection) == [classwise.key], (
            f"a backfill recorded by {user} is no longer a request the daemon takes up: {backfill}")
        instance.update_backfill(backfill.with_status(BulkActionStatus.COMPLETED_SUCCESS))
        assert wait_for_backfill(instance, backfill_id, timeout_s=5).status == BulkActionStatus.COMPLETED_SUCCESS, (
            f"COMPLETED_SUCCESS is no longer among Dagster's terminal backfill states: {user} waits for those")


def test_an_asset_check_evaluation_takes_the_materialization_it_is_of():
    target_type = internal("dagster._core.definitions.asset_checks.asset_check_evaluation",
                           "AssetCheckEvaluationTargetMaterializationData", "saeseg_assets/checks.py")
    try:
        target = target_type(storage_id=7, run_id="a-run", timestamp=1.0)
        evaluation = dg.AssetCheckEvaluation(asset_key=dg.AssetKey("report"), check_name="evaluated", passed=True,
                                             partition="001_wall", target_materialization_data=target)
    except TypeError as error:
        pytest.fail(f"Dagster changed how a check evaluation names its materialization ({error}): "
                    "saeseg_assets/checks.py logs one per class so")
    assert evaluation.target_materialization_data.storage_id == 7 and evaluation.partition == "001_wall"


def test_the_run_launcher_finds_a_launched_runs_worker_and_sees_it_die(tmp_path):
    """A run launched as the daemon launches it (a code server starts its worker), through `dagster job launch`:
    the launcher finds the worker from the run's tags and first event, checks it alive, then gone after SIGKILL,
    and reads what the step wrote to stderr."""
    user = "saeseg_assets/launcher.py"
    for module, name in (("dagster._core.launcher", "CheckRunHealthResult"), ("dagster._core.launcher", "WorkerStatus"),
                         ("dagster._core.storage.tags", "GRPC_INFO_TAG")):
        internal(module, name, user)
    from saeseg_assets.launcher import LocalRunLauncher, WorkerStatus, process_alive, worker_process

    home = tmp_path / "home"
    home.mkdir()
    # Dagster's default coordinator launches at once, with no daemon; it has no public name.
    (home / "dagster.yaml").write_text("run_launcher: {module: saeseg_assets.launcher, class: LocalRunLauncher}\n"
                                       "run_coordinator: {module: dagster._core.run_coordinator, "
                                       "class: DefaultRunCoordinator}\ntelemetry: {enabled: false}\n")
    ready = tmp_path / "ready"
    (tmp_path / "job.py").write_text(f'''
import sys, time
from pathlib import Path
import dagster as dg

@dg.op
def wait():
    print("the step says hello", file=sys.stderr, flush=True)
    Path({str(ready)!r}).touch()
    time.sleep(120)

@dg.job(executor_def=dg.in_process_executor)
def waiting():
    wait()
''')
    # The command waits for the run's end: its code server serves the run until then.
    log = tmp_path / "launch.log"
    with open(log, "w") as out:
        launch = subprocess.Popen([str(DAGSTER), "job", "launch", "-f", str(tmp_path / "job.py"), "-j", "waiting"],
                                  env={**os.environ, "DAGSTER_HOME": str(home)}, cwd=tmp_path, stdout=out,
                                  stderr=subprocess.STDOUT)
    runs, worker = [], None
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            launcher = instance.run_launcher
            assert isinstance(launcher, LocalRunLauncher)
            deadline = time.time() + 90
            while time.time() < deadline and launch.poll() is None:
                runs = instance.get_runs()
                if runs and (worker := worker_process(instance, runs[0])) is not None and ready.exists():
                    break
                time.sleep(0.2)
            assert runs, f"no run launched:\n{log.read_text()[-3000:]}"
            run = runs[0]
            messages = [r.event_log_entry.message for r in instance.get_records_for_run(run.run_id).records]
            assert worker is not None, (
                f"no worker found for a launched run: Dagster no longer notes its code server in the run tag "
                f"GRPC_INFO_TAG ({sorted(run.tags)}), or the worker's first event no longer starts 'Started process "
                f"for run (pid: ' ({messages}); {user} reads both")
            pid, started = worker
            assert launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING
            os.kill(pid, signal.SIGKILL)
            while process_alive(pid, started) and time.time() < deadline:
                time.sleep(0.2)
            health = launcher.check_run_worker_health(run)
            assert health.status == WorkerStatus.FAILED and "is gone" in health.msg, health
            said = launcher.get_run_worker_debug_info(run) or ""
            assert said.startswith("wait:\n") and "the step says hello" in said, said
    finally:
        # The worker, then the command (which stops its code server once the run is over).
        if worker is not None and process_alive(*worker):
            os.kill(worker[0], signal.SIGKILL)
        try:
            launch.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launch.kill()
            launch.wait()
