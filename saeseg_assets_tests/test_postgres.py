"""The instance of deploy/postgres/dagster.yaml on a real PostgreSQL server started here, with the daemon's run queue
(at most 3 runs at once) and run monitoring: the 150 classes as one backfill of 5 runs, and faults survived (a run
killed with SIGKILL, the database stopped during a run, two runs writing the same classes at once), on tiny data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import dagster as dg
import pytest

from benchmarks.postgres_server import PostgresServer, find_bin
from saeseg_assets.core.store.artifacts import MANIFEST
from saeseg_assets.partitions import class_partitions
from saeseg_assets.staleness import PARTITION_RANGE_TAGS
from saeseg_assets_tests.test_cli import materialize, tiny_env, write_checkpoints
from saeseg_assets_tests.test_ui import BIN, descendants, start, stop, wait_for

REPO = Path(__file__).resolve().parents[1]
DEPLOY_YAML = REPO / "deploy" / "postgres" / "dagster.yaml"
CLASSES = list(class_partitions.get_partition_keys())
CLASSWISE = "class_latents,suppression_report"
REPORT = "suppression_report"
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})  # no process per step: setup only
# The fault tests' runs keep a process per step, as a deployment that isolates steps does: what they kill and stop.
STEP_PROCESSES = {"SAESEG_EXECUTOR": "multiprocess"}


@pytest.fixture(scope="module")
def postgres_server():
    """Debian's PostgreSQL on a free localhost port in a temporary folder, stopped and deleted afterwards."""
    bin_dir = find_bin()
    if bin_dir is None:
        message = "no PostgreSQL server binaries (apt-get install postgresql; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them: never a silent skip there
        pytest.skip(message)
    server = PostgresServer(bin_dir).init()
    yield server
    server.close()


def postgres_home(server: PostgresServer, database: str, home: Path) -> dict[str, str]:
    """`home` as a DAGSTER_HOME holding deploy/postgres/dagster.yaml; the variables that point it at `database`."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEPLOY_YAML, home / "dagster.yaml")
    return {**server.env(database), "DAGSTER_HOME": str(home)}


@contextmanager
def instance_of(env: dict[str, str]):
    """The Dagster instance of `env`: the YAML's variables are read when it is made."""
    with mock.patch.dict(os.environ, env):
        instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    with instance:
        yield instance


@pytest.fixture
def postgres_instance(postgres_server, tmp_path, monkeypatch):
    """A DAGSTER_HOME on a fresh database of the test server, set in the environment; yields its instance."""
    env = postgres_home(postgres_server, postgres_server.create_database(f"t{time.time_ns()}"), tmp_path / "home")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with instance_of(env) as instance:
        yield instance


def test_the_deploy_instance_runs_on_postgres_and_keeps_its_records_across_a_crash(postgres_instance,
                                                                                  postgres_server):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    instance = postgres_instance
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert instance.run_coordinator.get_run_queue_config().max_concurrent_runs == 3
    assert instance.run_monitoring_enabled

    @dg.asset
    def answer() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"value": 42})

    for _ in range(2):
        assert dg.materialize([answer], instance=instance).success
    runs = {r.run_id: r.status for r in instance.get_runs()}
    events = instance.fetch_materializations(dg.AssetKey("answer"), limit=10).records

    postgres_server.stop("immediate")  # as a crash: no checkpoint, the log is replayed at the next start
    try:
        with pytest.raises(Exception, match="Connection refused|could not connect|too many retries"):
            instance.get_runs()
    finally:
        postgres_server.start()
    assert {r.run_id: r.status for r in instance.get_runs()} == runs
    again = instance.fetch_materializations(dg.AssetKey("answer"), limit=10).records
    assert [(r.storage_id, r.asset_materialization.metadata["value"].value) for r in again] == [
        (r.storage_id, 42) for r in events]


# The tiny world: its shared assets are materialized once; each test gets a copy of its database and data folder.

@dataclass
class World:
    root: Path
    env: dict[str, str]

    @property
    def data(self) -> Path:
        return Path(self.env["SAESEG_DATA"])

    def instance(self):
        return instance_of(self.env)

    @contextmanager
    def daemon(self):
        """`dagster-daemon run` over the definitions without sensors: it runs what the test asks for, nothing else."""
        process = start([str(BIN / "dagster-daemon"), "run", "-m", "saeseg_assets_tests.assets_only"], self.env,
                        self.root / "daemon.log")
        try:
            yield process
        finally:
            stop(process)

    def backfill(self, first: str, last: str) -> str:
        """Submits a backfill of the class assets (README's command); its id. The daemon's first look, and one
        every 30 s after, starts its runs."""
        done = subprocess.run([sys.executable, "-m", "saeseg_assets.backfill", "--select", CLASSWISE,
                               "--partition-range", f"{first}...{last}"], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.split()[1].rstrip(":")

    def log(self) -> str:
        path = self.root / "daemon.log"
        return path.read_text()[-4000:] if path.exists() else ""


def shared_assets() -> list[str]:
    """The unpartitioned assets above the class reports (CLASSWISE, the shortcut study) and the summary (which reads
    the probe's baseline too). The final-layer probe only feeds the propagated study, which these tests leave out
    (the summary reads it where it exists): the tiny world's 4 training images are one chunk, too few to select it."""
    import saeseg_assets

    graph = saeseg_assets.defs.resolve_asset_graph()
    above = (dg.AssetSelection.assets("suppression_summary").upstream()
             - dg.AssetSelection.assets("propagated_report").upstream(include_self=False)
             | dg.AssetSelection.assets(*CLASSWISE.split(",")).upstream()).resolve(graph)
    return sorted(k.to_user_string() for k in above
                  if graph.get(k).partitions_def is None and k.to_user_string() != "suppression_summary")


def make_template_world(server: PostgresServer, root: Path) -> World:
    """Tiny data, the SAE and probe as checkpoints to import, and the shared assets materialized (CLI, one process)
    in the database `world`."""
    write_checkpoints(root / "ckpt" / "sae", root / "ckpt" / "probe")
    env = tiny_env(root, SAESEG_SAE_CHECKPOINT=str(root / "ckpt" / "sae"),
                   SAESEG_PROBE_CHECKPOINT=str(root / "ckpt" / "probe"))
    env.update(postgres_home(server, server.create_database("world"), root / "dagster_home"))
    materialize(env, "--select", ",".join(shared_assets()), "--config-json", IN_PROCESS)
    return World(root, env)


@pytest.fixture(scope="module")
def template_world(postgres_server, tmp_path_factory) -> World:
    return make_template_world(postgres_server, tmp_path_factory.mktemp("pg_world"))


def clone_world(template: World, server: PostgresServer, root: Path, **settings: str) -> World:
    """A copy of the template's database (PostgreSQL's CREATE DATABASE ... TEMPLATE) and data folder: the shared
    assets materialized, no class yet. Store keys do not depend on the data folder, so the copy finds them."""
    database = server.create_database(f"w{time.time_ns()}", template="world")
    shutil.copytree(template.data, root / "data", symlinks=True)
    env = {**template.env, **postgres_home(server, database, root / "dagster_home"),
           "SAESEG_DATA": str(root / "data"), **settings}
    return World(root, env)


@pytest.fixture
def world_factory(template_world, postgres_server, tmp_path):
    def make(name: str, **settings: str) -> World:
        return clone_world(template_world, postgres_server, tmp_path / name, **settings)
    return make


def backfill_runs(instance: dg.DagsterInstance, backfill_id: str) -> list[dg.RunRecord]:
    return list(instance.get_run_records(filters=dg.RunsFilter.for_backfill(backfill_id)))


def wait_for_runs(world: World, instance: dg.DagsterInstance, backfill_id: str, n_runs: int,
                  timeout: float) -> list[dg.RunRecord]:
    """The backfill's runs, once `n_runs` of them exist and all have ended."""
    def ended():
        records = backfill_runs(instance, backfill_id)
        return len(records) == n_runs and all(r.dagster_run.is_finished for r in records) and records
    try:
        return wait_for(ended, timeout, f"{n_runs} runs of backfill {backfill_id} to end", interval=2)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{world.log()}") from None


def class_range(record: dg.RunRecord) -> list[str]:
    first, last = (record.dagster_run.tags[t] for t in PARTITION_RANGE_TAGS)
    return CLASSES[CLASSES.index(first): CLASSES.index(last) + 1]


def materializations(instance: dg.DagsterInstance, asset: str) -> dict[str, list[dg.EventLogRecord]]:
    """Per class, every materialization of a class asset."""
    found: dict[str, list[dg.EventLogRecord]] = {}
    cursor = None
    while True:
        result = instance.fetch_materializations(dg.AssetKey(asset), limit=1000, cursor=cursor)
        for record in result.records:
            found.setdefault(record.partition_key, []).append(record)
        if not result.has_more:
            return found
        cursor = result.cursor


def class_folders(data: Path, asset: str = REPORT) -> dict[str, list[Path]]:
    """Per class, its published folders in the store (one per key)."""
    found: dict[str, list[Path]] = {}
    for folder in sorted(data.glob(f"{asset}/[!.]*/[!.]*")):
        found.setdefault(folder.name, []).append(folder)
    return found


CLASS_FILES = {"class_latents": "class_latents.json", REPORT: "report.json"}


def assert_untorn(data: Path, instance: dg.DagsterInstance) -> None:
    """Every published class folder is whole (its manifest names its key and class; its JSON parses), and every
    recorded materialization's `key` points to such a folder."""
    for asset, file in CLASS_FILES.items():
        for key, folders in class_folders(data, asset).items():
            for folder in folders:
                manifest = json.loads((folder / MANIFEST).read_text())
                assert (manifest["key"], manifest["part"]) == (folder.parent.name, key), folder
                assert json.loads((folder / file).read_text())["class_key"] == key
        for key, records in materializations(instance, asset).items():
            for record in records:
                folder = data / asset / record.asset_materialization.metadata["key"].value / key
                assert (folder / MANIFEST).is_file(), folder


def running_at_once(records: list[dg.RunRecord]) -> int:
    """The largest number of the runs that were in progress at the same moment."""
    edges = sorted([(r.start_time, 1) for r in records] + [(r.end_time, -1) for r in records])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


@pytest.mark.slow
def test_150_classes_as_5_concurrent_runs_match_a_single_run(world_factory):
    world = world_factory("five", SAESEG_CLASSES_PER_RUN="30")
    backfill_id = world.backfill(CLASSES[0], CLASSES[-1])  # before the daemon: its first look starts the runs
    started = time.time()
    with world.daemon(), world.instance() as instance:
        records = wait_for_runs(world, instance, backfill_id, 5, 900)
        elapsed = time.time() - started
        assert all(r.dagster_run.is_success for r in records), world.log()
        assert sorted(CLASSES.index(class_range(r)[0]) for r in records) == [0, 30, 60, 90, 120]
        assert running_at_once(records) == 3  # the queue's limit, reached
        for asset in ("class_latents", REPORT):
            per_class = materializations(instance, asset)
            assert sorted(per_class) == CLASSES and all(len(r) == 1 for r in per_class.values()), asset
        materialize(world.env, "--select", "suppression_summary")
        summary = instance.get_latest_materialization_event(dg.AssetKey("suppression_summary"))
        meta = {k: v.value for k, v in summary.asset_materialization.metadata.items()}
        assert meta["n_classes_evaluated"] + meta["n_absent_from_validation"] + meta["n_without_latents"] == 150
        assert meta["n_stale"] == 0
    print(f"\n150 classes, 5 runs of 30, at most 3 at once: {elapsed:.0f} s from submission to the last run's end")

    # The same classes as one run (the default policy, through the CLI) in another copy of the world.
    single = world_factory("one")
    started = time.time()
    materialize(single.env, "--select", CLASSWISE, "--partition-range", f"{CLASSES[0]}...{CLASSES[-1]}")
    print(f"150 classes as one run (dagster asset materialize): {time.time() - started:.0f} s")
    five, one = class_folders(world.data), class_folders(single.data)
    assert sorted(five) == sorted(one) == CLASSES
    for key in CLASSES:
        (a,), (b,) = five[key], one[key]
        assert a.parent.name == b.parent.name  # the same key
        assert (a / "report.json").read_bytes() == (b / "report.json").read_bytes(), key


def mid_way(world: World, instance: dg.DagsterInstance, backfill_id: str, exclude=()) -> dg.RunRecord | None:
    """A run of the backfill (not in `exclude`) that has published some of its classes' reports, at most half: the
    rest cannot all be published in the moment before the kill."""
    published = {path.parent.name for path in world.data.glob(f"{REPORT}/[!.]*/[!.]*/{MANIFEST}")}
    for record in backfill_runs(instance, backfill_id):
        if record.dagster_run.status == dg.DagsterRunStatus.STARTED and record.dagster_run.run_id not in exclude:
            written = len(published.intersection(class_range(record)))
            if 0 < written <= len(class_range(record)) // 2:
                return record
    return None


def kill_run(instance: dg.DagsterInstance, record: dg.RunRecord, daemon_pid: int) -> list[int]:
    """SIGKILL for a run's worker process and the step processes under it, as a crash would; their ids."""
    from saeseg_assets.launcher import worker_process

    pid, _ = worker_process(instance, record.dagster_run)
    assert pid in descendants(daemon_pid)  # a process of this test's daemon, nothing else
    os.kill(pid, signal.SIGSTOP)  # frozen, so that its step processes can be listed before it is gone
    tree = [pid, *descendants(pid)]
    for p in tree:
        os.kill(p, signal.SIGKILL)
    return tree


def failure_message(instance: dg.DagsterInstance, run_id: str) -> str:
    """What the run's failure and the engine events before it say."""
    events = instance.all_logs(run_id, of_type={dg.DagsterEventType.ENGINE_EVENT, dg.DagsterEventType.RUN_FAILURE})
    return "\n".join(e.message or "" for e in events[-4:])


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
def test_runs_killed_mid_way_are_failed_and_relaunching_their_classes_completes_the_set(world_factory):
    """Two of the 5 runs get SIGKILL half-way through their reports. The first one's code server notices its worker
    is gone; for the second, the code server is paused, so the daemon's run monitoring has to notice."""
    from saeseg_assets.launcher import worker_process

    world = world_factory("killed", SAESEG_CLASSES_PER_RUN="30", **STEP_PROCESSES)
    backfill_id = world.backfill(CLASSES[0], CLASSES[-1])
    with world.daemon() as daemon, world.instance() as instance:
        victims, messages = [], []
        for code_server_paused in (False, True):
            killed_ids = [v.dagster_run.run_id for v in victims]
            victim = wait_for(lambda: mid_way(world, instance, backfill_id, killed_ids), 600, "a run half-way",
                              interval=0.02)
            code_server = parent(worker_process(instance, victim.dagster_run)[0])
            if code_server_paused:
                os.kill(code_server, signal.SIGSTOP)
            try:
                killed = kill_run(instance, victim, daemon.pid)
                wait_for(lambda: instance.get_run_by_id(victim.dagster_run.run_id).is_finished, 120,
                         "the killed run to be marked failed", interval=0.5)
            finally:
                os.kill(code_server, signal.SIGCONT)
            victims.append(victim)
            messages.append(failure_message(instance, victim.dagster_run.run_id))
            print(f"\nkilled {killed}; the run's last events:\n{messages[-1]}")
        # The first: its code server or the daemon's run monitoring, whichever looks first (a race: the run's tree,
        # its class workers included, takes a moment to die).
        assert "was terminated by signal 9 (SIGKILL)" in messages[0] or "is gone" in messages[0]
        assert "is gone" in messages[1] and "Marking run" in messages[1]  # by run monitoring
        records = wait_for_runs(world, instance, backfill_id, 5, 900)
        failed = sorted(r.dagster_run.run_id for r in records if r.dagster_run.status == dg.DagsterRunStatus.FAILURE)
        assert failed == sorted(v.dagster_run.run_id for v in victims), world.log()
        assert sum(r.dagster_run.is_success for r in records) == 3
        assert_untorn(world.data, instance)
        recorded, published = materializations(instance, REPORT), class_folders(world.data)
        classes = [key for victim in victims for key in class_range(victim)]
        assert not any(key in recorded for key in classes)  # a step's materializations are recorded at its end
        done_before = {key for key in classes if key in published}
        assert all(0 < len(done_before & set(class_range(v))) < 30 for v in victims)

        relaunches = [world.backfill(class_range(v)[0], class_range(v)[-1]) for v in victims]
        for relaunch in relaunches:
            (record,) = wait_for_runs(world, instance, relaunch, 1, 600)
            assert record.dagster_run.is_success, world.log()
        assert_untorn(world.data, instance)
        recorded = materializations(instance, REPORT)
        assert sorted(recorded) == CLASSES and all(len(r) == 1 for r in recorded.values())
        reused = {key for key in classes if recorded[key][0].asset_materialization.metadata["reused"].value}
        assert reused == done_before  # what the killed runs had published is found, the rest computed


def recorded_state(instance: dg.DagsterInstance) -> tuple[dict, set]:
    """Every run's status, and the storage id of every event recorded."""
    runs = {r.run_id: r.status for r in instance.get_runs()}
    events = {record.storage_id for run_id in runs for record in instance.get_records_for_run(run_id).records}
    return runs, events


@pytest.mark.slow
def test_a_run_fails_when_the_database_stops_and_nothing_recorded_is_lost(world_factory, postgres_server):
    from saeseg_assets.launcher import (
        captured_stderr_tail,
        process_alive,
        worker_process,
    )

    world = world_factory("db_stopped", **STEP_PROCESSES)
    backfill_id = world.backfill(CLASSES[0], CLASSES[59])  # one run (the default policy)
    with world.daemon():
        with world.instance() as instance:
            run = wait_for(lambda: mid_way(world, instance, backfill_id), 600, "the run half-way", interval=0.02)
            pid, started = worker_process(instance, run.dagster_run)
            runs_before, events_before = recorded_state(instance)
        postgres_server.stop("immediate")
        try:
            wait_for(lambda: not process_alive(pid, started), 300, "the run's worker to give up", interval=0.5)
        finally:
            postgres_server.start()
        with world.instance() as instance:
            failed = wait_for(lambda: (r := instance.get_run_by_id(run.dagster_run.run_id)).is_finished and r, 120,
                              "the run to be marked failed")
            assert failed.status == dg.DagsterRunStatus.FAILURE
            message = failure_message(instance, failed.run_id)
            # What the step wrote when the database went away: its captured stderr, the UI's log view of the step.
            said = captured_stderr_tail(instance, failed.run_id) or ""
            print(f"\nthe run's last events:\n{message}\nits steps' last stderr lines:\n{said[-1500:]}")
            assert "exited with code 1" in message or "is gone" in message
            assert "too many retries for DB connection" in said and "Connection refused" in said
            runs_after, events_after = recorded_state(instance)
            assert events_before <= events_after
            assert {r: s for r, s in runs_after.items() if r in runs_before and r != failed.run_id} == {
                r: s for r, s in runs_before.items() if r != failed.run_id}
            for asset in shared_assets():
                assert instance.get_latest_materialization_event(dg.AssetKey(asset)) is not None, asset
            assert_untorn(world.data, instance)


@pytest.mark.slow
def test_two_runs_writing_the_same_classes_at_once_both_finish_with_whole_folders(world_factory):
    world = world_factory("twice", **STEP_PROCESSES)
    command = [str(BIN / "dagster"), "asset", "materialize", "-m", "saeseg_assets", "--select", CLASSWISE,
               "--partition-range", f"{CLASSES[0]}...{CLASSES[29]}"]
    runs = [subprocess.Popen(command, env=world.env, cwd=world.root, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [run.communicate(timeout=600)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    with world.instance() as instance:
        records = list(instance.get_run_records())
        assert running_at_once([r for r in records if r.dagster_run.tags.get(PARTITION_RANGE_TAGS[0])]) == 2
        both_wrote = []
        for asset in CLASS_FILES:
            recorded = materializations(instance, asset)
            assert sorted(recorded) == CLASSES[:30]
            for key, pair in recorded.items():
                assert len(pair) == 2 and len({r.asset_materialization.metadata["key"].value for r in pair}) == 1
                if not any(r.asset_materialization.metadata["reused"].value for r in pair):
                    both_wrote.append((asset, key))
        # Classes both runs computed and published: one rename won, the other copy was dropped.
        assert both_wrote
        assert_untorn(world.data, instance)
    for key, (folder,) in class_folders(world.data).items():  # one folder per class, holding one whole write
        files = {p.name: p.stat().st_size for p in folder.iterdir()}
        assert {MANIFEST, "report.json"} <= set(files) and all(files.values()), folder
        if json.loads((folder / "report.json").read_text())["status"] == "evaluated":
            assert {"examples.png", "dose_response.png"} <= set(files), folder
    for asset in CLASS_FILES:
        assert not any((world.data / asset / ".tmp").glob("*"))  # the second copy of each class was dropped
