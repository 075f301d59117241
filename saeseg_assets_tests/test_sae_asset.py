"""The `sae_weights` asset and its checks, materialized on tiny synthetic caches recorded as its inputs."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import dagster as dg
import pytest
import torch

from saeseg_assets.artifacts import latest_key
from saeseg_assets.assets.sae import sae_weights
from saeseg_assets.checks import sae_checks
from saeseg_assets.core.sae import Sae, SaeSpec, save_sae
from saeseg_assets.resources import Backbone, Checkpoints, Storage

from .conftest import record_synthetic_cache

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


def _materialize(world: World, config: dict | None = None, checkpoint: str = "", checks_config: dict | None = None):
    run_config = {"ops": {"sae_weights": {"config": {**TRAINING, **(config or {})}}, **(checks_config or {})}}
    result = dg.materialize([sae_weights, *sae_checks], run_config=run_config, raise_on_error=False,
                            instance=world.instance,
                            resources={"storage": world.storage, "checkpoints": Checkpoints(sae=checkpoint),
                                       "backbone": Backbone()})
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
