"""The checkpoint sensors tick by tick (new, unchanged, half-written, missing), where the import asset looks, the
downstream re-run condition on a toy graph, and the nightly schedule's choice of stale assets."""

import os
from pathlib import Path

import dagster as dg
import pytest

from saeseg_assets.automation import (CHECKPOINT_TAG, DOWNSTREAM_CONDITION, checkpoint_to_import,
                                      nightly_stale_refresh, probe_checkpoint_sensor, sae_checkpoint_sensor)
from saeseg_assets.core.checkpoint_watch import (Seen, WatchState, content_sha256, drop_folder, find_checkpoint,
                                                 step)
from saeseg_assets.resources import Checkpoints, Storage

# The automation-condition tester selects with a beta parameter of its own.
pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning")


def tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, data: Path, cursor: str | None,
         configured: str = "") -> tuple[list[dg.RunRequest], str | None]:
    """One evaluation of a checkpoint sensor; returns its run requests and the cursor for the next tick."""
    resources = {"storage": Storage(data_dir=str(data)), "checkpoints": Checkpoints(sae=configured, probe=configured)}
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    result = sensor.evaluate_tick(context)
    return list(result.run_requests or []), result.cursor


def write_pair(folder: Path, kind: str, weights: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{kind}.safetensors").write_bytes(weights)
    (folder / f"{kind}.json").write_text('{"d_model": 8}')


def test_drop_folder_layout_and_precedence(tmp_path):
    data = tmp_path / "data"
    assert drop_folder(data, "sae") == data / "checkpoints" / "sae"
    assert find_checkpoint("sae", data) is None  # no folder at all
    sae = drop_folder(data, "sae")
    sae.mkdir(parents=True)
    (sae / "sae.pt").write_bytes(b"{}\nreference")
    assert find_checkpoint("sae", data).source == sae / "sae.pt"
    (sae / "sae.safetensors").write_bytes(b"weights")
    half = find_checkpoint("sae", data)
    assert half.source == sae and not half.complete  # our pair wins over sae.pt, and is not complete yet
    (sae / "sae.json").write_text("{}")
    assert find_checkpoint("sae", data).complete
    storage = Storage(data_dir=str(data))
    assert checkpoint_to_import("sae", storage, "") == sae
    # The configured path wins even before it exists: the import then fails naming it, rather than training.
    assert checkpoint_to_import("sae", storage, str(tmp_path / "elsewhere.pt")) == tmp_path / "elsewhere.pt"
    assert checkpoint_to_import("probe", storage, "") is None


def test_content_hash_ignores_times_and_sees_bytes(tmp_path):
    write_pair(tmp_path, "probe", b"abc")
    files = (tmp_path / "probe.safetensors", tmp_path / "probe.json")
    first = content_sha256(files)
    os.utime(files[0], (1, 1))
    assert content_sha256(files) == first
    files[0].write_bytes(b"abd")
    assert content_sha256(files)[0] != first[0] and content_sha256(files)[1] == first[1]


def test_step_accepts_only_content_seen_twice():
    a, b = Seen("a" * 64, 10, "x"), Seen("b" * 64, 12, "x")
    state, accepted = step(WatchState(), a)
    assert accepted is None and state.pending == a
    state, accepted = step(state, b)  # changed between looks: still being written
    assert accepted is None and state.pending == b
    state, accepted = step(state, b)
    assert accepted == b.sha256 and state == WatchState(b.sha256, None)
    assert step(state, b) == (state, None)
    assert step(state, None) == (state, None)
    assert WatchState.from_json(WatchState("c", a).to_json()) == WatchState("c", a)


def test_sensor_new_unchanged_and_changed_checkpoint(tmp_path):
    data = tmp_path / "data"
    folder = drop_folder(data, "sae")
    with dg.instance_for_test() as instance:
        runs, cursor = tick(sae_checkpoint_sensor, instance, data, None)
        assert runs == []  # no drop folder yet
        write_pair(folder, "sae", b"first weights")
        runs, cursor = tick(sae_checkpoint_sensor, instance, data, cursor)
        assert runs == []  # seen once: might still be growing
        runs, cursor = tick(sae_checkpoint_sensor, instance, data, cursor)
        (run,) = runs
        expected = content_sha256((folder / "sae.safetensors", folder / "sae.json"))[0]
        assert run.run_key == expected and run.tags[CHECKPOINT_TAG] == expected
        assert run.asset_selection == [dg.AssetKey("sae_weights")]
        os.utime(folder / "sae.safetensors")  # a touch is not a change
        for _ in range(2):
            runs, cursor = tick(sae_checkpoint_sensor, instance, data, cursor)
            assert runs == []
        write_pair(folder, "sae", b"second weights")
        runs, cursor = tick(sae_checkpoint_sensor, instance, data, cursor)
        assert runs == []
        runs, cursor = tick(sae_checkpoint_sensor, instance, data, cursor)
        assert len(runs) == 1 and runs[0].run_key != expected


def test_sensor_waits_for_a_file_being_written(tmp_path):
    data = tmp_path / "data"
    folder = drop_folder(data, "probe")
    folder.mkdir(parents=True)
    with dg.instance_for_test() as instance:
        (folder / "probe.safetensors").write_bytes(b"x" * 100)
        runs, cursor = tick(probe_checkpoint_sensor, instance, data, None)
        runs, cursor = tick(probe_checkpoint_sensor, instance, data, cursor)
        assert runs == []  # half a pair, however long it stays
        (folder / "probe.json").write_text("{}")
        for size in (200, 300):  # still growing on every look
            (folder / "probe.safetensors").write_bytes(b"x" * size)
            runs, cursor = tick(probe_checkpoint_sensor, instance, data, cursor)
            assert runs == []
        runs, cursor = tick(probe_checkpoint_sensor, instance, data, cursor)
        assert [r.asset_selection for r in runs] == [[dg.AssetKey("probe_checkpoint")]]


def test_sensor_watches_the_configured_reference_file(tmp_path):
    configured = tmp_path / "ref" / "sae.pt"
    with dg.instance_for_test() as instance:
        runs, cursor = tick(sae_checkpoint_sensor, instance, tmp_path / "data", None, str(configured))
        assert runs == []  # configured but not there yet
        configured.parent.mkdir()
        configured.write_bytes(b'{"d_vit": 8}\npayload')
        # A drop-folder checkpoint is ignored while a path is configured.
        write_pair(drop_folder(tmp_path / "data", "sae"), "sae", b"other")
        for _ in range(2):
            runs, cursor = tick(sae_checkpoint_sensor, instance, tmp_path / "data", cursor, str(configured))
        assert len(runs) == 1 and runs[0].tags["saeseg/checkpoint"] == str(configured)


# A toy graph shaped like ours: an import asset, a shared asset, a class-partitioned one and a summary over it.
classes = dg.StaticPartitionsDefinition(["001_wall", "002_building", "010_grass"])


@dg.asset
def weights(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(data_version=dg.DataVersion(context.run.tags.get("version", "1")))


@dg.asset(deps=[weights], automation_condition=DOWNSTREAM_CONDITION)
def stats() -> None:
    pass


@dg.asset(deps=[stats], partitions_def=classes, automation_condition=DOWNSTREAM_CONDITION)
def report() -> None:
    pass


@dg.asset(deps=[report], automation_condition=DOWNSTREAM_CONDITION)
def summary() -> None:
    pass


TOY = [weights, stats, report, summary]


def requested(result) -> dict[str, set]:
    return {k.to_user_string(): set(result.get_requested_partitions(k))
            for k in (stats.key, report.key, summary.key) if result.get_requested_partitions(k)}


def settle(instance: dg.DagsterInstance, cursor) -> tuple[list[dict], object]:
    """Ticks the automation conditions, materializing what each tick requests, until a tick requests nothing."""
    ticks = []
    for _ in range(6):
        result = dg.evaluate_automation_conditions(defs=TOY, instance=instance, cursor=cursor)
        cursor = result.cursor
        ticks.append(requested(result))
        if not ticks[-1]:
            return ticks[:-1], cursor
        for name, partitions in ticks[-1].items():
            asset = {"stats": stats, "report": report, "summary": summary}[name]
            for partition in partitions:
                assert dg.materialize(TOY, instance=instance, selection=[asset], partition_key=partition).success
    raise AssertionError(f"never settled: {ticks}")


def test_downstream_condition_reruns_what_exists_when_an_input_changes():
    with dg.instance_for_test() as instance:
        ticks, cursor = settle(instance, None)
        assert ticks == []  # nothing exists yet: nothing is filled in
        assert dg.materialize([weights, stats], instance=instance).success
        for key in ("001_wall", "010_grass"):
            assert dg.materialize(TOY, instance=instance, partition_key=key, selection=[report]).success
        assert dg.materialize(TOY, instance=instance, selection=[summary]).success
        ticks, cursor = settle(instance, cursor)
        # Runs launched by hand already covered their children (weights ran with stats; each report before summary).
        assert ticks == []

        assert dg.materialize([weights], instance=instance, tags={"version": "1"}).success
        ticks, cursor = settle(instance, cursor)
        assert ticks == []  # same data version: nothing to redo

        assert dg.materialize([weights], instance=instance, tags={"version": "2"}).success
        ticks, cursor = settle(instance, cursor)
        # The chain, one level of partitioning per tick; only the classes that existed, all in one request.
        assert ticks == [{"stats": {None}}, {"report": {"001_wall", "010_grass"}}, {"summary": {None}}]


def test_nightly_schedule_requests_stale_assets_as_one_run():
    defs = dg.Definitions(assets=TOY, schedules=[nightly_stale_refresh])
    assert nightly_stale_refresh.default_status == dg.DefaultScheduleStatus.STOPPED
    with dg.instance_for_test() as instance:
        assert dg.materialize([weights, stats], instance=instance).success
        for key in ("001_wall", "002_building"):
            assert dg.materialize(TOY, instance=instance, partition_key=key, selection=[report]).success

        def evaluate():
            context = dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def())
            return nightly_stale_refresh.evaluate_tick(context)

        assert evaluate().run_requests == []  # fresh, and the missing summary is not "stale"
        assert dg.materialize([weights], instance=instance, tags={"version": "2"}).success
        (run,) = evaluate().run_requests
        # stats is stale; the reports below it are redone too, the missing class and summary are not made.
        assert set(run.asset_selection) == {stats.key, report.key}
        assert run.tags["dagster/asset_partition_range_start"] == "001_wall"
        assert run.tags["dagster/asset_partition_range_end"] == "002_building"
        assert dg.materialize(TOY, instance=instance, selection=run.asset_selection, tags=run.tags).success
        assert evaluate().run_requests == []


@pytest.mark.parametrize("sensor", [sae_checkpoint_sensor, probe_checkpoint_sensor])
def test_checkpoint_sensors_run_by_default(sensor):
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
