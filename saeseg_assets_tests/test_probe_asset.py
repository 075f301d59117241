"""The `probe_checkpoint` and `baseline_metrics` assets on tiny synthetic caches: files, metadata, reuse, import,
and proof that training and selection never read the validation cache."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import torch

from saeseg_assets.assets.probe import baseline_metrics, probe_checkpoint
from saeseg_assets.core.data.cache import CACHE_FOLDER, ActivationCache
from saeseg_assets.core.probe.evaluation import BASELINE_COLUMNS
from saeseg_assets.core.probe.model import load_probe
from saeseg_assets.core.store.artifacts import OutputSpec
from saeseg_assets.core.store.checkpoints import CheckpointError
from saeseg_assets.recipe import latest_key
from saeseg_assets.resources import Checkpoints, Compute, Storage
from saeseg_assets_tests.conftest import record_artifact
from saeseg_assets_tests.test_probe import D_MODEL, _reference_file, write_toy_cache

SMALL = {"lrs": [1e-5, 3e-2], "weight_decays": [1e-5], "epochs": 4, "batch_size": 8, "held_out_fraction": 0.34}


@dataclass
class World:
    """Toy caches recorded as the latest activation assets of one Dagster instance."""

    storage: Storage
    instance: dg.DagsterInstance

    def folder(self, asset: str) -> Path:
        return self.storage.store.open(asset, latest_key(self.instance, asset))


@pytest.fixture
def world(tmp_path):
    with dg.instance_for_test() as instance:
        storage = Storage(data_dir=str(tmp_path / "data"))
        for asset, split, n, seed in (("train_activations", "training", 12, 0), ("val_activations", "validation", 6, 1)):
            spec = OutputSpec(asset, 1, {"toy": seed})
            record_artifact(instance, storage, spec, lambda folder, n=n, seed=seed, split=split: write_toy_cache(
                folder / CACHE_FOLDER, n_images=n, seed=seed, split=split))
        yield World(storage, instance)


def _materialize(world: World, assets=(probe_checkpoint, baseline_metrics), probe_config=SMALL,
                 checkpoints: Checkpoints | None = None) -> dg.ExecuteInProcessResult:
    return dg.materialize(list(assets), instance=world.instance,
                          resources={"storage": world.storage, "compute": Compute(),
                                     "checkpoints": checkpoints or Checkpoints()},
                          run_config={"ops": {"probe_checkpoint": {"config": probe_config}}}
                          if probe_checkpoint in assets else None)


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict:
    event = next(e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key))
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_assets_write_the_probe_and_the_baseline_table_then_reuse_the_probe(world):
    result = _materialize(world)
    probe_md, baseline_md = _metadata(result, "probe_checkpoint"), _metadata(result, "baseline_metrics")
    assert (probe_md["lr"], probe_md["weight_decay"], probe_md["reused"]) == (3e-2, 1e-5, False)
    assert probe_md["selection_miou"] > 0.8
    assert probe_md["path"] == str(world.folder("probe_checkpoint"))
    assert probe_md["sweep"].startswith("| lr | weight_decay | selection_miou")
    assert probe_md["sweep_heatmap"].startswith("![sweep](data:image/png;base64,")
    assert load_probe(world.folder("probe_checkpoint")).d_model == D_MODEL

    table = pd.read_csv(world.folder("baseline_metrics") / "baseline_metrics.csv")
    assert list(table.columns) == list(BASELINE_COLUMNS)
    assert baseline_md["n_classes_present"] == int(table["present"].sum()) == 4
    # Metadata shows 4 significant digits (artifacts.readable); the files keep full precision.
    assert baseline_md["miou"] == pytest.approx(table.loc[table["present"], "iou"].mean(), rel=5e-4)
    assert 0.5 < baseline_md["miou"] <= 1 and 0.5 < baseline_md["pixel_accuracy"] <= 1
    assert "| class_key | iou |" in baseline_md["classes"] and "patch_accuracy" in baseline_md["classes"]
    assert baseline_md["iou_chart"].startswith("![per-class IoU](data:image/png;base64,")
    summary = json.loads((world.folder("baseline_metrics") / "baseline_metrics.json").read_text())
    assert summary["miou"] == pytest.approx(baseline_md["miou"], rel=5e-4)

    again = _materialize(world)
    assert _metadata(again, "probe_checkpoint")["reused"] is True
    assert _metadata(again, "baseline_metrics")["reused"] is True
    assert _metadata(again, "probe_checkpoint")["key"] == probe_md["key"]
    other = _materialize(world, probe_config={**SMALL, "epochs": 2})  # another config trains anew
    assert _metadata(other, "probe_checkpoint")["reused"] is False
    assert _metadata(other, "baseline_metrics")["key"] != baseline_md["key"]  # and the baseline follows it
    back = _materialize(world)  # switching back reuses both folders with no work
    assert (_metadata(back, "probe_checkpoint")["reused"], _metadata(back, "baseline_metrics")["reused"]) == (
        True, True)


def test_training_and_selection_never_read_validation(world, monkeypatch):
    paths_read = []
    read = ActivationCache.read

    def recording_read(self, name, start, stop):
        paths_read.append(self.path)
        return read(self, name, start, stop)

    monkeypatch.setattr(ActivationCache, "read", recording_read)
    _materialize(world, assets=[probe_checkpoint])
    assert set(paths_read) == {world.folder("train_activations") / CACHE_FOLDER}
    paths_read.clear()
    _materialize(world, assets=[baseline_metrics])
    assert set(paths_read) == {world.folder("val_activations") / CACHE_FOLDER}


def test_a_reference_probe_is_imported_from_config_or_resource(world, tmp_path):
    linear = torch.nn.Linear(D_MODEL, 151)
    source = _reference_file(tmp_path / "ref_probe.pt", linear.state_dict(), {"lr": 1e-3})
    # The same content imported again is the same artifact: the second import reuses the first.
    for (config, checkpoints), reused in zip((({**SMALL, "import_path": str(source)}, None),
                                              (SMALL, Checkpoints(probe=str(source)))), (False, True)):
        result = _materialize(world, probe_config=config, checkpoints=checkpoints)
        metadata = _metadata(result, "probe_checkpoint")
        assert (metadata["source"], metadata["reused"], metadata["imported_from"]) == ("imported", reused,
                                                                                      str(source))
        probe = load_probe(world.folder("probe_checkpoint"))
        assert torch.equal(probe.weight_CD, linear.weight.detach())
        assert "n_classes_present" in _metadata(result, "baseline_metrics")


def test_a_probe_of_another_width_is_refused_and_the_old_one_kept(world, tmp_path):
    _materialize(world, assets=[probe_checkpoint])
    before = latest_key(world.instance, "probe_checkpoint")
    wide = _reference_file(tmp_path / "vitb_probe.pt", torch.nn.Linear(768, 151).state_dict(), {})
    with pytest.raises(Exception) as info:
        _materialize(world, assets=[probe_checkpoint], probe_config={**SMALL, "import_path": str(wide)})
    error = info.value
    while not isinstance(error, CheckpointError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, CheckpointError) and "vitb_probe.pt" in str(error) and "768" in str(error)
    assert latest_key(world.instance, "probe_checkpoint") == before
    assert world.storage.store.keys("probe_checkpoint") == [before]  # nothing of the refused import was published


def test_a_probe_with_nan_weights_is_refused_and_the_old_one_kept(world, tmp_path):
    _materialize(world, assets=[probe_checkpoint])
    before = latest_key(world.instance, "probe_checkpoint")
    state = torch.nn.Linear(D_MODEL, 151).state_dict()
    state["weight"][5, 2] = float("nan")
    bad = _reference_file(tmp_path / "nan_probe.pt", state, {})
    with pytest.raises(Exception) as info:
        _materialize(world, assets=[probe_checkpoint], probe_config={**SMALL, "import_path": str(bad)})
    error = info.value
    while not isinstance(error, CheckpointError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, CheckpointError) and f"{bad}: the probe holds NaN or infinite values" in str(error)
    assert latest_key(world.instance, "probe_checkpoint") == before
    assert world.storage.store.keys("probe_checkpoint") == [before]
