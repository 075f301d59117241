"""The latent and suppression assets end to end on a tiny world written to a temporary data folder: one class,
an absent class, a partition range in one run, the summary; and (slow) the CLI's `--partition-range`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from saeseg_assets.assets.latents import class_latents, latent_stats
from saeseg_assets.assets.suppression import suppression_report, suppression_summary, val_codes
from saeseg_assets.core.ade20k import list_split, load_sample, patch_labels
from saeseg_assets.core.cache import CacheSettings, CacheWriter
from saeseg_assets.core.probe import Probe, save_probe
from saeseg_assets.core.sae import Sae, SaeSpec, save_sae
from saeseg_assets.core.suppression_report import METRIC_NAMES
from saeseg_assets.resources import Backbone, Storage

from .conftest import asset_metadata, write_tiny_ade20k

D_MODEL, CROP, PATCH = 8, 28, 14
SLOTS = {1: 0, 2: 1, 3: 2, 10: 3}  # label -> the model direction its patches carry
SHARED = [latent_stats, val_codes]
CLASSWISE = [class_latents, suppression_report]
# The f1 rule (the default, named here so the test does not depend on it); with activation_sum, note that in a world
# of 24 training tokens every latent fires on more than 1% of them, so all would count as dense.
RUN_CONFIG = {"ops": {"class_latents": {"config": {"rule": "f1"}}}}


def write_world(root: Path) -> Storage:
    """Tiny ADE20K-format data (labels 1..3 on the left half, 10 = grass on the right), caches whose tokens carry
    3 x the direction of their label, a ReLU SAE whose first latents are those directions, a probe reading them."""
    dataset = write_tiny_ade20k(root / "ade", n_train=6, n_val=3)
    storage = Storage(data_dir=str(root / "data"))
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        samples = list_split(dataset, split)
        settings = CacheSettings(backbone="toy", backbone_source="toy", layer=0, crop_size=CROP, patch_size=PATCH,
                                 d_model=D_MODEL, dataset_root=str(dataset), split=split, preprocessing="toy",
                                 dtype="float32")
        writer = CacheWriter(storage.cache_path(split), settings, [s.image_id for s in samples], chunk_images=4)
        for a in range(0, len(samples), 4):
            chunk = samples[a:a + 4]
            pixels = np.stack([load_sample(s, CROP)[1] for s in chunk])
            labels, purity = patch_labels(pixels, PATCH)
            acts = 0.05 * rng.standard_normal((len(chunk), 4, D_MODEL))
            for (b, p), label in np.ndenumerate(labels.reshape(len(chunk), 4)):
                if label in SLOTS:
                    acts[b, p, SLOTS[label]] += 3.0
            writer.write_chunk(a, acts.astype(np.float32), labels, purity, pixels)
        writer.finish()
    sae = Sae(SaeSpec("relu", D_MODEL, 12))
    W = torch.nn.functional.normalize(torch.randn(12, D_MODEL, generator=torch.Generator().manual_seed(0)), dim=1)
    W[:D_MODEL] = torch.eye(D_MODEL)
    with torch.no_grad():
        sae.W_dec_SD.copy_(W)
        sae.W_enc_SD.copy_(W)
        sae.b_enc_S.fill_(-0.5)
    save_sae(sae, storage.path("sae"), {"source": "test"})
    weight, bias = torch.zeros(151, D_MODEL), torch.zeros(151)
    for label, slot in SLOTS.items():
        weight[label, slot] = 1.0
    save_probe(storage.path("probe"), Probe(weight, bias, {"source": "test"}))
    return storage


def resources(storage: Storage) -> dict:
    return {"storage": storage, "backbone": Backbone()}


@pytest.fixture
def world(tmp_path) -> Storage:
    storage = write_world(tmp_path)
    assert dg.materialize(SHARED, resources=resources(storage)).success
    return storage


def test_one_class_and_an_absent_class(world):
    result = dg.materialize(CLASSWISE, resources=resources(world), partition_key="010_grass", run_config=RUN_CONFIG)
    assert result.success
    chosen = json.loads(world.path("class_latents", "010_grass.json").read_text())
    assert chosen["latents"][0] == SLOTS[10] and chosen["status"] == "chosen"
    report = json.loads(world.path("suppression", "010_grass.json").read_text())
    assert report["status"] == "evaluated" and report["latents"] == chosen["latents"]
    meta = asset_metadata(result, "suppression_report", "010_grass")
    for name in (*METRIC_NAMES, "latents", "scale", "mode", "specific", "summary", "examples"):
        assert name in meta, name
    assert all(isinstance(meta[name], float) for name in METRIC_NAMES)
    assert meta["scale"] == -2.0 and meta["mode"] == "every_token" and isinstance(meta["specific"], bool)
    # The probe reads grass from the direction the SAE's latent 3 decodes: suppressing it changes grass patches.
    assert meta["target_change_rate"] > 0.5 and meta["target_iou_after"] < meta["target_iou_before"]
    assert "| mode |" in meta["summary"] and "data:image/png;base64" in meta["examples"]
    gallery = asset_metadata(result, "class_latents", "010_grass")["gallery"]
    assert "data:image/png;base64" in gallery

    absent = dg.materialize(CLASSWISE, resources=resources(world), partition_key="150_flag", run_config=RUN_CONFIG)
    assert absent.success
    assert json.loads(world.path("class_latents", "150_flag.json").read_text())["latents"] == []
    meta = asset_metadata(absent, "suppression_report", "150_flag")
    assert meta["status"] == "absent_from_validation" and "reason" in meta


def test_partition_range_in_one_run_then_summary(world):
    tags = {"dagster/asset_partition_range_start": "001_wall", "dagster/asset_partition_range_end": "010_grass"}
    result = dg.materialize(CLASSWISE, resources=resources(world), tags=tags, run_config=RUN_CONFIG)
    assert result.success
    keys = ["001_wall", "002_building", "003_sky", "004_floor", "005_tree", "006_ceiling", "007_road", "008_bed",
            "009_windowpane", "010_grass"]
    assert sorted(p.stem for p in world.path("suppression").glob("*.json")) == keys
    statuses = {k: asset_metadata(result, "suppression_report", k)["status"] for k in keys}
    assert statuses["010_grass"] == "evaluated" and statuses["004_floor"] == "absent_from_validation"
    # Idempotent: the same range again rewrites the same reports.
    before = world.path("suppression", "010_grass.json").read_text()
    assert dg.materialize(CLASSWISE, resources=resources(world), tags=tags, run_config=RUN_CONFIG).success
    assert world.path("suppression", "010_grass.json").read_text() == before

    summary = dg.materialize([suppression_summary], resources=resources(world))
    assert summary.success
    meta = asset_metadata(summary, "suppression_summary")
    evaluated = [k for k, s in statuses.items() if s == "evaluated"]
    assert meta["n_classes_evaluated"] == len(evaluated) >= 2
    for name in ("n_specific", "best_scale", "best_mode", "n_specific_best", "preview"):
        assert name in meta
    assert (world.path("suppression_summary", "summary.csv")).exists()


def test_stale_class_latents_fail_before_any_report_is_written(world):
    assert dg.materialize(CLASSWISE, resources=resources(world), partition_key="010_grass",
                          run_config=RUN_CONFIG).success
    report = world.path("suppression", "010_grass.json").read_text()
    chosen_path = world.path("class_latents", "010_grass.json")
    chosen = json.loads(chosen_path.read_text())
    chosen["latent_stats"]["sae_sha256"] = "another SAE"
    chosen_path.write_text(json.dumps(chosen))
    result = dg.materialize([suppression_report], resources=resources(world), partition_key="010_grass",
                            raise_on_error=False)
    assert not result.success
    assert world.path("suppression", "010_grass.json").read_text() == report


@pytest.mark.slow
def test_cli_partition_range_over_all_classes(world, tmp_path):
    """`dagster asset materialize --partition-range 001_wall...150_flag` runs all 150 classes in one run."""
    defs_file = tmp_path / "defs.py"
    defs_file.write_text(textwrap.dedent(f"""
        import dagster as dg
        from saeseg_assets.assets import latents, suppression
        from saeseg_assets.resources import Backbone, Storage
        defs = dg.Definitions(assets=dg.load_assets_from_modules([latents, suppression]),
                              resources={{"storage": Storage(data_dir={str(world.root)!r}), "backbone": Backbone()}})
    """))
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAESEG_", "DAGSTER_"))}
    env["DAGSTER_HOME"] = str(home)
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster), "asset", "materialize", "-f", str(defs_file), "--select",
               "class_latents,suppression_report", "--partition-range", "001_wall...150_flag"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(world.path("suppression").glob("*.json"))) == 150
    assert len(list(world.path("class_latents").glob("*.json"))) == 150
