"""The checkpoint sensors tick by tick (new, unchanged, half-written, missing), where the import asset looks, the
downstream re-run condition on a stand-in graph, and the nightly schedule's choice of stale assets and classes.

Evaluation contexts are closed with `with`: one left open keeps its instance set as the process's definitions-state
store until garbage collection, and a later `dagster.materialize` then fails on the disposed instance."""

import io
import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest

from saeseg_assets.automation import (
    CHECKPOINT_QUIET_S,
    CHECKPOINT_TAG,
    DOWNSTREAM_CONDITION,
    nightly_stale_refresh,
    probe_checkpoint_sensor,
    sae_checkpoint_sensor,
)
from saeseg_assets.core.store.checkpoint_watch import (
    QUIET_PERIOD_S,
    Seen,
    WatchState,
    content_sha256,
    drop_folder,
    find_checkpoint,
    step,
)
from saeseg_assets.partitions import class_partitions
from saeseg_assets.resources import Checkpoints, Compute, Storage
from saeseg_assets.staleness import PARTITION_RANGE_TAGS, STALE_BLOCK_TAG
from saeseg_assets_tests.conftest import record_synthetic_cache

# The automation-condition tester selects with a beta parameter of its own.
pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning")


def tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, data: Path, cursor: str | None,
         configured: str = "") -> tuple[list[dg.RunRequest], str | None]:
    """One evaluation of a checkpoint sensor; returns its run requests and the cursor for the next tick."""
    resources = {"storage": Storage(data_dir=str(data)), "checkpoints": Checkpoints(sae=configured, probe=configured)}
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = sensor.evaluate_tick(context)
    return list(result.run_requests or []), result.cursor


def write_pair(folder: Path, kind: str, weights: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{kind}.safetensors").write_bytes(weights)
    (folder / f"{kind}.json").write_text('{"d_model": 8}')


def quiet(*paths: Path) -> None:
    """As if the files had been left alone for longer than the quiet period."""
    then = time.time() - CHECKPOINT_QUIET_S - 1
    for path in paths:
        os.utime(path, (then, then))


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
    # SAELens's pair comes after ours and before a .pt; either of its files claims the folder.
    for name in ("sae.safetensors", "sae.json"):
        (sae / name).unlink()
    (sae / "cfg.json").write_text("{}")
    saelens = find_checkpoint("sae", data)
    assert saelens.files == (sae / "sae_weights.safetensors", sae / "cfg.json") and not saelens.complete
    assert find_checkpoint("sae", data, str(sae / "cfg.json")).files == saelens.files
    (sae / "sae_weights.safetensors").write_bytes(b"weights")
    assert find_checkpoint("sae", data).complete
    for name in ("sae_weights.safetensors", "cfg.json"):
        (sae / name).unlink()
    (sae / "sae.safetensors").write_bytes(b"weights")
    (sae / "sae.json").write_text("{}")
    storage = Storage(data_dir=str(data))
    assert find_checkpoint("sae", storage.root, "").source == sae
    # The configured path wins even before it exists: the import then fails naming it, rather than training.
    assert find_checkpoint("sae", storage.root, str(tmp_path / "elsewhere.pt")).source == tmp_path / "elsewhere.pt"
    assert find_checkpoint("probe", storage.root, "") is None


def test_content_hash_ignores_times_and_sees_bytes(tmp_path):
    write_pair(tmp_path, "probe", b"abc")
    files = (tmp_path / "probe.safetensors", tmp_path / "probe.json")
    first = content_sha256(files)
    os.utime(files[0], (1, 1))
    assert content_sha256(files) == first
    files[0].write_bytes(b"abd")
    assert content_sha256(files)[0] != first[0] and content_sha256(files)[1] == first[1]


def test_step_accepts_only_content_seen_twice_and_quiet_for_the_quiet_period():
    now = 1_000_000.0
    a, b = Seen("a" * 64, 10, "x", now - 100), Seen("b" * 64, 12, "x", now - 100)
    state, accepted = step(WatchState(), a, now, quiet_s=60)
    assert accepted is None and state.pending == a
    state, accepted = step(state, b, now, quiet_s=60)  # changed between looks: still being written
    assert accepted is None and state.pending == b
    state, accepted = step(state, b, now, quiet_s=60)
    assert accepted == b.sha256 and state == WatchState(b.sha256, None)
    assert step(state, b, now) == (state, None)
    assert step(state, None, now) == (state, None)
    assert WatchState.from_json(WatchState("c", a).to_json()) == WatchState("c", a)
    # Same bytes on two looks, but written 30 s ago: not settled until 60 s have passed.
    recent = Seen("d" * 64, 12, "x", now - 30)
    state, _ = step(WatchState(), recent, now, quiet_s=60)
    assert step(state, recent, now, quiet_s=60)[1] is None
    assert step(state, recent, now + 30, quiet_s=60)[1] == recent.sha256
    # Touched between the looks (same bytes, another time): looked at afresh.
    assert step(state, Seen("d" * 64, 12, "x", now - 10), now + 30, quiet_s=60)[1] is None
    assert QUIET_PERIOD_S == 60 and CHECKPOINT_QUIET_S == float(os.environ.get("SAESEG_CHECKPOINT_QUIET_S") or 60)


def test_sensor_new_unchanged_and_changed_checkpoint(tmp_path):
    data = tmp_path / "data"
    folder = drop_folder(data, "sae")
    with dg.instance_for_test() as instance:
        runs, cursor = tick(sae_checkpoint_sensor, instance, data, None)
        assert runs == []  # no drop folder yet
        write_pair(folder, "sae", b"first weights")
        for _ in range(2):
            runs, cursor = tick(sae_checkpoint_sensor, instance, data, cursor)
            assert runs == []  # written a moment ago: might still be growing, however often it is seen
        quiet(folder / "sae.safetensors", folder / "sae.json")
        runs, cursor = tick(sae_checkpoint_sensor, instance, data, cursor)
        assert runs == []  # quiet, but seen once so
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
        quiet(folder / "sae.safetensors", folder / "sae.json")
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
            quiet(folder / "probe.safetensors", folder / "probe.json")
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
        quiet(configured)
        # A drop-folder checkpoint is ignored while a path is configured.
        write_pair(drop_folder(tmp_path / "data", "sae"), "sae", b"other")
        for _ in range(2):
            runs, cursor = tick(sae_checkpoint_sensor, instance, tmp_path / "data", cursor, str(configured))
        assert len(runs) == 1 and runs[0].tags["saeseg/checkpoint"] == str(configured)


def test_a_paused_half_written_checkpoint_is_never_imported(tmp_path):
    """Issue 12: 40% of a sae.pt written, a pause, then the rest. A short pause never triggers; a pause longer than
    the quiet period does, but the run it starts imports nothing: not the partial bytes (unreadable, named), and not
    the finished file either when it is done by the time the run reads it (not the content seen)."""
    import torch

    from saeseg_assets.assets.sae import sae_weights
    from saeseg_assets.core.sae.model import Sae, SaeSpec
    from saeseg_assets.recipe import latest_key

    sae = Sae.initialized(SaeSpec("relu", 32, 64), torch.full((32,), 0.5), seed=0)
    buffer = io.BytesIO()
    torch.save({k: v.clone() for k, v in sae.file_tensors().items()}, buffer)
    whole = (json.dumps({"d_vit": 32, "exp_factor": 2}) + "\n").encode() + buffer.getvalue()
    data = tmp_path / "data"
    path = drop_folder(data, "sae") / "sae.pt"
    path.parent.mkdir(parents=True)
    with dg.instance_for_test() as instance:
        storage = Storage(data_dir=str(data))
        record_synthetic_cache(instance, storage, "train_activations", n_images=8, seed=0)
        record_synthetic_cache(instance, storage, "val_activations", n_images=4, seed=1, split="validation")

        def run(request: dg.RunRequest) -> dg.ExecuteInProcessResult:
            """What the daemon launches for the request, reading the drop folder as it is now."""
            return dg.materialize([sae_weights], instance=instance, tags=request.tags, raise_on_error=False,
                                  resources={"storage": storage, "checkpoints": Checkpoints(), "compute": Compute()})

        path.write_bytes(whole[:len(whole) * 4 // 10])
        cursor = None
        for _ in range(3):  # unchanged on every look, but written moments ago
            runs, cursor = tick(sae_checkpoint_sensor, instance, data, cursor)
            assert runs == []
        quiet(path)  # the writer pauses past the quiet period: the partial file settles
        for _ in range(2):
            runs, cursor = tick(sae_checkpoint_sensor, instance, data, cursor)
        (partial,) = runs
        assert partial.tags[CHECKPOINT_TAG] == content_sha256((path,))[0]
        failed = run(partial)  # still partial when the run reads it: refused, the file named
        assert not failed.success and f"{path}: not a torch-saved state dict" in str(failed.all_events)
        path.write_bytes(whole)  # the writer goes on and finishes ...
        quiet(path)
        failed = run(partial)  # ... before a (re)started run reads it: not the content the sensor saw
        assert not failed.success and "the content changed after the sensor saw it" in str(failed.all_events)
        assert not storage.store.keys("sae_weights")  # neither imported anything
        for _ in range(2):
            runs, cursor = tick(sae_checkpoint_sensor, instance, data, cursor)
        (finished,) = runs
        assert finished.tags[CHECKPOINT_TAG] == content_sha256((path,))[0] != partial.tags[CHECKPOINT_TAG]
        assert run(finished).success
        settings = storage.store.manifest("sae_weights", latest_key(instance, "sae_weights"))["settings"]
        assert settings["import_sha256"] == finished.tags[CHECKPOINT_TAG]


# A stand-in graph shaped like ours: unpartitioned inputs, two class-partitioned assets run as one run per block of
# classes, and a summary over the classes. Each run gives an asset a new data version, unless `weights` is told one.
@dg.asset
def weights(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(data_version=dg.DataVersion(context.run.tags.get("version", "1")))


@dg.asset(deps=[weights], automation_condition=DOWNSTREAM_CONDITION)
def stats() -> None:
    pass


@dg.asset(deps=[stats], partitions_def=class_partitions, backfill_policy=dg.BackfillPolicy.single_run(),
          automation_condition=DOWNSTREAM_CONDITION)
def latents() -> None:
    pass


@dg.asset(deps=[latents, stats], partitions_def=class_partitions, backfill_policy=dg.BackfillPolicy.single_run(),
          automation_condition=DOWNSTREAM_CONDITION)
def report() -> None:
    pass


@dg.asset(deps=[report], automation_condition=DOWNSTREAM_CONDITION)
def summary() -> None:
    pass


STAND_IN = [weights, stats, latents, report, summary]


def materialize(instance: dg.DagsterInstance, assets: list, partition: str | None = None, **tags: str) -> None:
    assert dg.materialize(STAND_IN, instance=instance, selection=assets, partition_key=partition, tags=tags).success


def build(instance: dg.DagsterInstance, classes: list[str], with_summary: bool = True) -> None:
    """Everything materialized for `classes`, one class per run."""
    materialize(instance, [weights, stats])
    for key in classes:
        materialize(instance, [latents, report], key)
    if with_summary:
        materialize(instance, [summary])


def requested(result) -> dict[str, set]:
    return {k.to_user_string(): set(result.get_requested_partitions(k))
            for k in (stats.key, latents.key, report.key, summary.key) if result.get_requested_partitions(k)}


def settle(instance: dg.DagsterInstance, cursor) -> tuple[list[dict], object]:
    """Ticks the automation conditions, materializing what each tick requests, until a tick requests nothing."""
    ticks = []
    for _ in range(6):
        result = dg.evaluate_automation_conditions(defs=STAND_IN, instance=instance, cursor=cursor)
        cursor = result.cursor
        ticks.append(requested(result))
        if not ticks[-1]:
            return ticks[:-1], cursor
        for name, partitions in ticks[-1].items():
            asset = {"stats": stats, "latents": latents, "report": report, "summary": summary}[name]
            for partition in partitions:
                materialize(instance, [asset], partition)
    raise AssertionError(f"never settled: {ticks}")


def test_downstream_condition_reruns_what_exists_when_an_input_changes():
    with dg.instance_for_test() as instance:
        ticks, cursor = settle(instance, None)
        assert ticks == []  # nothing exists yet: nothing is filled in
        materialize(instance, [weights, stats])
        for key in ("001_wall", "010_grass"):
            materialize(instance, [latents], key)
            materialize(instance, [report], key)
        materialize(instance, [summary])
        ticks, cursor = settle(instance, cursor)
        # Runs launched by hand already covered their children (weights ran with stats; each report before summary).
        assert ticks == []

        materialize(instance, [weights], version="1")
        ticks, cursor = settle(instance, cursor)
        assert ticks == []  # same data version: nothing to redo

        materialize(instance, [weights], version="2")
        ticks, cursor = settle(instance, cursor)
        # The chain, one level of partitioning per tick; only the classes that existed, all in one request.
        both = {"001_wall", "010_grass"}
        assert ticks == [{"stats": {None}}, {"latents": both, "report": both}, {"summary": {None}}]


def nightly(instance: dg.DagsterInstance, assets: list = STAND_IN) -> list[dg.RunRequest]:
    """One tick of the nightly schedule; the context is closed after it, as the daemon does."""
    defs = dg.Definitions(assets=assets, schedules=[nightly_stale_refresh])
    with dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def()) as context:
        return list(nightly_stale_refresh.evaluate_tick(context).run_requests or [])


def summarize(runs: list[dg.RunRequest]) -> list[tuple]:
    return [(sorted(k.to_user_string() for k in run.asset_selection), *(run.tags.get(t) for t in PARTITION_RANGE_TAGS),
             run.tags[STALE_BLOCK_TAG]) for run in runs]


def run_all(instance: dg.DagsterInstance, runs: list[dg.RunRequest]) -> None:
    """What the daemon launches for the requests, one after the other."""
    for run in runs:
        assert dg.materialize(STAND_IN, instance=instance, selection=run.asset_selection, tags=run.tags).success


def test_nightly_schedule_requests_a_contiguous_block_as_one_run():
    assert nightly_stale_refresh.default_status == dg.DefaultScheduleStatus.STOPPED
    with dg.instance_for_test() as instance:
        build(instance, ["001_wall", "002_building"], with_summary=False)
        assert nightly(instance) == []  # fresh, and the missing summary is not "stale"
        materialize(instance, [weights], version="1")
        assert nightly(instance) == []  # the same data version again: nothing changed
        materialize(instance, [weights], version="2")
        runs = nightly(instance)
        # stats is stale; what exists below it is redone too, the summary that does not exist is not made.
        assert summarize(runs) == [(["latents", "report", "stats"], "001_wall", "002_building", "1/1")]
        run_all(instance, runs)
        assert nightly(instance) == []


def test_nightly_schedule_requests_exactly_the_stale_classes():
    with dg.instance_for_test() as instance:
        build(instance, ["001_wall", "002_building", "010_grass"])
        for key in ("001_wall", "010_grass"):
            materialize(instance, [latents], key)
        runs = nightly(instance)
        # Two runs of one class each, not 001 to 010; the summary goes with the last.
        assert summarize(runs) == [(["report"], "001_wall", "001_wall", "1/2"),
                                   (["report", "summary"], "010_grass", "010_grass", "2/2")]
        assert [run.run_key for run in runs] == ["001_wall...001_wall", "010_grass...010_grass"]
        run_all(instance, runs)
        assert nightly(instance) == []
        # A class redone by hand leaves the summary behind it: the summary alone, no classes.
        materialize(instance, [report], "002_building")
        assert summarize(nightly(instance)) == [(["summary"], None, None, "1/1")]


def test_nightly_schedule_does_not_fill_in_classes_never_materialized():
    with dg.instance_for_test() as instance:
        build(instance, ["001_wall", "002_building", "010_grass"])
        materialize(instance, [weights], version="2")
        runs = nightly(instance)
        # Inputs above the classes go first, the summary last; 003 to 009 and the other classes are not made.
        assert summarize(runs) == [(["latents", "report", "stats"], "001_wall", "002_building", "1/2"),
                                   (["latents", "report", "summary"], "010_grass", "010_grass", "2/2")]
        run_all(instance, runs)
        assert nightly(instance) == []
        assert set(instance.get_materialized_partitions(report.key)) == {"001_wall", "002_building", "010_grass"}


def test_nightly_schedule_redoes_an_asset_whose_code_version_changed():
    stats_v2 = dg.asset(name="stats", deps=[weights], code_version="2")(lambda: None)
    with dg.instance_for_test() as instance:
        build(instance, ["003_sky"])
        runs = nightly(instance, [weights, stats_v2, latents, report, summary])
        assert summarize(runs) == [(["latents", "report", "stats", "summary"], "003_sky", "003_sky", "1/1")]


@pytest.mark.filterwarnings("ignore:Property `OpDefinition.version` is deprecated:DeprecationWarning")  # inside Dagster
def test_nightly_schedule_sees_a_new_version_of_an_observed_source():
    seen = {"version": ""}

    @dg.observable_source_asset(name="dataset")
    def dataset() -> dg.DataVersion:
        return dg.DataVersion(seen["version"])

    cache = dg.asset(name="cache", deps=[dataset])(lambda: None)
    observation = dg.Definitions(assets=[dataset], jobs=[dg.define_asset_job("observe", [dataset])])

    def observe(instance: dg.DagsterInstance, version: str) -> None:
        seen["version"] = version
        assert observation.resolve_job_def("observe").execute_in_process(instance=instance).success

    with dg.instance_for_test() as instance:
        observe(instance, "a")
        assert dg.materialize([dataset, cache], instance=instance, selection=[cache]).success
        observe(instance, "a")
        assert nightly(instance, [dataset, cache]) == []  # observed again, same version
        observe(instance, "b")
        assert summarize(nightly(instance, [dataset, cache])) == [(["cache"], None, None, "1/1")]


@pytest.mark.parametrize("sensor", [sae_checkpoint_sensor, probe_checkpoint_sensor])
def test_checkpoint_sensors_run_by_default(sensor):
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_nightly_schedule_splits_a_block_into_runs_of_the_backfill_policy_size():
    by_two = dg.BackfillPolicy.multi_run(max_partitions_per_run=2)
    assets = [weights, stats, latents.with_attributes(backfill_policy=by_two),
              report.with_attributes(backfill_policy=by_two), summary]
    with dg.instance_for_test() as instance:
        build(instance, ["001_wall", "002_building", "003_sky"])
        materialize(instance, [weights], version="2")
        assert summarize(nightly(instance, assets)) == [
            (["latents", "report", "stats"], "001_wall", "002_building", "1/2"),
            (["latents", "report", "summary"], "003_sky", "003_sky", "2/2")]
