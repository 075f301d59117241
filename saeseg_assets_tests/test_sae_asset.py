"""The `sae_weights` asset and its checks, materialized on tiny synthetic caches recorded as its inputs: training,
reuse, the SAELens copy, imports from config, resource and drop folder, and bad checkpoints that change nothing."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import dagster as dg
import pytest
import torch

from saeseg_assets.assets.latents import latent_stats
from saeseg_assets.assets.sae import sae_weights
from saeseg_assets.automation import CHECKPOINT_TAG
from saeseg_assets.checks import sae_checks
from saeseg_assets.core.sae.importing import read_sae_checkpoint
from saeseg_assets.core.sae.model import Sae, SaeSpec, load_sae, save_sae
from saeseg_assets.core.store.checkpoint_watch import content_sha256, drop_folder
from saeseg_assets.recipe import latest_key
from saeseg_assets.resources import Checkpoints, Compute, Storage
from saeseg_assets_tests.conftest import record_synthetic_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINING = {"expansion": 4, "k": 8, "batch_size": 128, "train_tokens": 128 * 150, "lr": 1e-2, "warmup_steps": 10,
            "decay_fraction": 0.2, "buffer_images": 16, "log_every_steps": 50}


@dataclass
class World:
    """Synthetic caches recorded as the inputs of `sae_weights` in one Dagster instance."""

    storage: Storage
    instance: dg.DagsterInstance


@pytest.fixture
def world(tmp_path):
    with dg.instance_for_test() as instance:
        storage = Storage(data_dir=str(tmp_path / "data"))
        record_synthetic_cache(instance, storage, "train_activations", n_images=32, seed=0)
        record_synthetic_cache(instance, storage, "val_activations", n_images=8, seed=1, split="validation")
        yield World(storage, instance)


def _materialize(world: World, config: dict | None = None, checkpoint: str = "", checks_config: dict | None = None,
                 tags: dict | None = None):
    run_config = {"ops": {"sae_weights": {"config": {**TRAINING, **(config or {})}}, **(checks_config or {})}}
    result = dg.materialize([sae_weights, *sae_checks], run_config=run_config, raise_on_error=False,
                            instance=world.instance, tags=tags,
                            resources={"storage": world.storage, "checkpoints": Checkpoints(sae=checkpoint),
                                       "compute": Compute()})
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    if not result.success:
        return result, None, checks
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("sae_weights")[0].metadata.items()}
    return result, metadata, checks


def test_trains_records_the_figures_and_reuses_the_result(world):
    result, md, checks = _materialize(world)
    assert result.success
    for name in ("fvu", "mse", "l0", "dead_fraction", "dense_fraction", "architecture", "d_sae", "tokens_trained",
                 "path", "training_curve", "reused"):
        assert name in md, name
    assert md["fvu"] < 0.25 and md["l0"] <= 8 and md["dead_fraction"] <= 0.1
    assert (md["architecture"], md["d_sae"], md["tokens_trained"], md["reused"]) == ("topk", 128, 150 * 128, False)
    assert md["training_curve"].startswith("![SAE training curve](data:image/png;base64,")
    assert md["path"] == str(world.storage.store.path("sae_weights", md["key"]))
    assert (world.storage.root / "sae_weights" / md["key"] / "sae.safetensors").is_file()
    assert checks == {"sae_weights_finite": True, "sae_fvu_within_bound": True, "sae_dead_fraction_within_bound": True}
    # The SAELens copy beside ours reads back, through the importer, to the very same codes.
    folder = world.storage.store.path("sae_weights", md["key"])
    assert md["saelens_copy"] == str(folder / "saelens")
    ours, copy = load_sae(folder)[0], read_sae_checkpoint(folder / "saelens").model(True)
    x = torch.randn(50, 32)
    assert all(torch.equal(a, b) for a, b in zip(ours.encode(x), copy.encode(x)))
    data_version = result.asset_materializations_for_node("sae_weights")[0].tags["dagster/data_version"]

    assert data_version == md["key"]

    again, md2, _ = _materialize(world)
    assert md2["reused"] is True and md2["fvu"] == md["fvu"]
    assert again.asset_materializations_for_node("sae_weights")[0].tags["dagster/data_version"] == data_version
    # A setting that changes the weights gives another key; one that only changes speed does not.
    assert _materialize(world, {"k": 4})[1]["key"] != md["key"]
    assert _materialize(world, {"log_every_steps": 7})[1]["key"] == md["key"]


def test_check_bounds_are_configurable(world):
    strict = {"sae_weights_sae_fvu_within_bound": {"config": {"max_fvu": 0.01}},
              "sae_weights_sae_dead_fraction_within_bound": {"config": {"max_dead_fraction": 0.0}}}
    result, md, checks = _materialize(world, checks_config=strict)
    assert result.success
    assert checks["sae_fvu_within_bound"] is False
    assert checks["sae_dead_fraction_within_bound"] is (md["dead_fraction"] == 0.0)


def _reference_file(path, sae: Sae) -> None:
    buffer = io.BytesIO()
    torch.save({k: v.clone() for k, v in sae.file_tensors().items()}, buffer)
    header = {"schema": 1, "cfg": {"d_vit": sae.spec.d_model, "exp_factor": 2}, "cls": "Relu"}
    path.write_bytes((json.dumps(header) + "\n").encode() + buffer.getvalue())


def _relu_sae(d_model: int) -> Sae:
    torch.manual_seed(0)
    return Sae.initialized(SaeSpec("relu", d_model, 2 * d_model), torch.zeros(d_model), seed=0)


def test_imports_from_config_or_from_the_checkpoints_resource(world, tmp_path):
    reference = tmp_path / "sae.pt"
    _reference_file(reference, _relu_sae(32))
    result, md, _ = _materialize(world, {"import_path": str(reference)})
    assert result.success
    assert (md["architecture"], md["d_sae"], md["imported_from"]) == ("relu", 64, str(reference.resolve()))
    assert md["training_curve"].startswith("No training curve")

    ours = tmp_path / "ours"
    save_sae(Sae.initialized(SaeSpec("topk", 32, 96, 5), torch.zeros(32), seed=1), ours, {"tokens_trained": 7})
    result, md, _ = _materialize(world, checkpoint=str(ours))  # what SAESEG_SAE_CHECKPOINT sets
    assert result.success
    assert (md["architecture"], md["d_sae"], md["tokens_trained"], md["l0"]) == ("topk", 96, 7, 5.0)

    # Its SAELens copy, dropped into the drop folder: the same codes, so the same figures.
    saelens = world.storage.store.path("sae_weights", md["key"]) / "saelens"
    drop = drop_folder(world.storage.root, "sae")
    drop.mkdir(parents=True)
    for name in ("cfg.json", "sae_weights.safetensors"):
        (drop / name).write_bytes((saelens / name).read_bytes())
    result, dropped, _ = _materialize(world)
    assert result.success and dropped["import_format"] == "SAELens topk (cfg.json + sae_weights.safetensors)"
    assert (dropped["imported_from"], dropped["fvu"], dropped["l0"]) == (str(drop), md["fvu"], md["l0"])


def test_a_checkpoint_of_another_width_fails_and_publishes_nothing(world, tmp_path):
    first = _materialize(world)[1]
    before = sorted(p.name for p in (world.storage.root / "sae_weights").iterdir())
    reference = tmp_path / "wide.pt"
    _reference_file(reference, _relu_sae(48))
    result, _, _ = _materialize(world, {"import_path": str(reference)})
    assert not result.success
    error = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    message = error.cause.message if error.cause else error.message
    assert f"{reference}: the SAE encodes d_model = 48" in message
    assert "holds d_model = 32" in message
    # Nothing new was published (an empty temporary folder may stay), and the latest SAE is still the trained one.
    assert sorted(p.name for p in (world.storage.root / "sae_weights").iterdir() if p.name != ".tmp") == before
    assert latest_key(world.instance, "sae_weights") == first["key"]


def _error(result) -> str:
    error = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    return error.cause.message if error.cause else error.message


def _downstream_requested(world: World, cursor):
    """One tick of the automation conditions of `latent_stats` (the first asset below sae_weights): whether it asks
    for a run, and the cursor for the next tick."""
    defs = dg.Definitions(assets=[sae_weights, latent_stats], resources={
        "storage": world.storage, "checkpoints": Checkpoints(), "compute": Compute()})
    result = dg.evaluate_automation_conditions(defs=defs, instance=world.instance, cursor=cursor)
    return bool(result.get_requested_partitions(latent_stats.key)), result.cursor


@pytest.mark.filterwarnings("ignore::dagster.BetaWarning")
def test_a_nan_checkpoint_changes_nothing_and_starts_nothing_downstream(world, tmp_path):
    first = _materialize(world)[1]
    world.instance.report_runless_asset_event(dg.AssetMaterialization("latent_stats", metadata={"key": "stats"}))
    requested, cursor = _downstream_requested(world, None)
    assert not requested
    before = world.storage.store.keys("sae_weights")

    # A NaN-weight pair dropped into the drop folder, as in issue 12 (a copy, then a rename into place).
    sae = Sae.initialized(SaeSpec("topk", 32, 64, 4), torch.zeros(32), seed=5)
    with torch.no_grad():
        sae.W_dec_SD[7, 3] = float("nan")
    save_sae(sae, tmp_path / "nan", {})
    folder = drop_folder(world.storage.root, "sae")
    folder.mkdir(parents=True)
    for name in ("sae.safetensors", "sae.json"):
        (tmp_path / "nan" / name).rename(folder / name)
    result, _, checks = _materialize(world)
    assert not result.success
    assert f"{folder}: W_dec holds 1 NaN or infinite values" in _error(result)
    assert checks == {}  # the checks never ran: there was nothing to check
    assert world.storage.store.keys("sae_weights") == before  # nothing published (an empty .tmp may stay)
    assert latest_key(world.instance, "sae_weights") == first["key"]
    assert not _downstream_requested(world, cursor)[0]

    # The same path with good weights does re-run latent_stats: the condition is alive.
    save_sae(Sae.initialized(SaeSpec("topk", 32, 64, 4), torch.zeros(32), seed=5), folder, {})
    assert _materialize(world)[0].success
    assert _downstream_requested(world, cursor)[0]


def test_the_import_reads_exactly_the_content_the_sensor_saw(world, tmp_path):
    folder = drop_folder(world.storage.root, "sae")
    save_sae(Sae.initialized(SaeSpec("topk", 32, 64, 4), torch.zeros(32), seed=1), folder, {})
    seen = content_sha256((folder / "sae.safetensors", folder / "sae.json"))[0]
    # The sensor saw other content (the file changed after its look): the run imports nothing.
    result, _, _ = _materialize(world, tags={CHECKPOINT_TAG: "0" * 64})
    assert not result.success
    assert f"{folder}: the content changed after the sensor saw it (sha256 {'0' * 64} then, {seen} as read now)" in (
        _error(result))
    assert not (world.storage.root / "sae_weights").exists() or not world.storage.store.keys("sae_weights")
    result, md, _ = _materialize(world, tags={CHECKPOINT_TAG: seen})
    assert result.success and md["import_format"] == "saeseg (sae.safetensors + sae.json)"
    assert world.storage.store.manifest("sae_weights", md["key"])["settings"] == {
        "import_sha256": seen, "import_subtracts_b_dec": "auto"}
    # The b_dec setting is part of the key: it can change what is imported.
    other = _materialize(world, {"import_subtracts_b_dec": "false"}, tags={CHECKPOINT_TAG: seen})[1]
    assert other["key"] != md["key"] and other["encoder_subtracts_b_dec"] is False
    assert not list(world.storage.root.glob(".import-*"))  # the copies are gone
