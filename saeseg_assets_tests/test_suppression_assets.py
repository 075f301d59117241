"""The latent and suppression assets end to end on a tiny world written to a temporary data folder: one class,
an absent class, a partition range in one run, the summary; and (slow) the CLI's `--partition-range`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from saeseg_assets.answer import answer
from saeseg_assets.assets.codes import tuning_codes, val_codes
from saeseg_assets.assets.latents import class_latents, latent_stats
from saeseg_assets.assets.reports import suppression_report
from saeseg_assets.assets.summary import suppression_summary
from saeseg_assets.checks import suppression_report_evaluated
from saeseg_assets.core.data.ade20k import list_split, load_sample, patch_labels
from saeseg_assets.core.data.cache import (
    CACHE_FOLDER,
    ActivationCache,
    CacheProvenance,
    CacheWriter,
)
from saeseg_assets.core.probe.model import Probe, save_probe
from saeseg_assets.core.report.results import ClassReport, ClassTable, read_result
from saeseg_assets.core.sae.model import Sae, SaeSpec, save_sae
from saeseg_assets.core.store.artifacts import OutputSpec
from saeseg_assets.core.study.examples import load_examples
from saeseg_assets.recipe import latest_key, latest_keys
from saeseg_assets.resources import Compute, Storage
from saeseg_assets_tests.conftest import (
    asset_metadata,
    record_artifact,
    write_tiny_ade20k,
)

D_MODEL, CROP, PATCH = 8, 28, 14
SLOTS = {1: 0, 2: 1, 3: 2, 10: 3}  # label -> the model direction its patches carry
SHARED = [latent_stats, val_codes, tuning_codes]
CLASSWISE = [class_latents, suppression_report]
# The f1 rule (the default, named here so the test does not depend on it); with activation_sum, note that in a world
# of 24 training tokens every latent fires on more than 1% of them, so all would count as dense.
RUN_CONFIG = {"ops": {"class_latents": {"config": {"rule": "f1"}}}}
# Figures of the configured setting every evaluated class's metadata shows, as numbers.
METRIC_NAMES = ("target_iou_before", "target_iou_after", "target_accuracy_before", "target_accuracy_after",
                "other_miou_before", "other_miou_after", "target_change_rate", "other_change_rate",
                "random_latents_target_change_rate", "random_latents_other_change_rate",
                "random_direction_target_change_rate", "random_direction_other_change_rate", "tpp_score",
                "target_iou_change", "random_direction_target_change_max")


@dataclass
class World:
    """A tiny world in one data folder, its inputs recorded as materialized in one Dagster instance."""

    storage: Storage
    instance: dg.DagsterInstance

    def folder(self, asset: str, partition: str | None = None) -> Path:
        return self.storage.store.open(asset, latest_key(self.instance, asset, partition), partition)

    def materialize(self, assets, **options) -> dg.ExecuteInProcessResult:
        return dg.materialize(assets, instance=self.instance, resources={"storage": self.storage,
                                                                         "compute": Compute()}, **options)


def write_world(root: Path, instance: dg.DagsterInstance, vit=None) -> World:
    """Tiny ADE20K-format data (labels 1..3 on the left half, 10 = grass on the right), caches whose tokens carry
    3 x the direction of their label, a ReLU SAE whose first latents are those directions, a probe reading them.
    With `vit` (a saved backbone folder, a layer-0 tail of it), the caches also hold random prefix tokens and the
    final tokens the tail gives, and name the folder as their backbone source."""
    dataset = write_tiny_ade20k(root / "ade", n_train=6, n_val=3)
    tail = None
    if vit is not None:
        from saeseg_assets.core.data.backbone import load_backbone
        from saeseg_assets.core.data.tail import BackboneTail

        tail = BackboneTail.of(load_backbone(str(vit), root), layer=0)
    storage = Storage(data_dir=str(root / "data"))
    rng = np.random.default_rng(0)
    for asset, split in (("train_activations", "training"), ("val_activations", "validation")):
        samples = list_split(dataset, split)
        settings = CacheProvenance(backbone="toy", backbone_source=str(vit or "toy"), layer=0, crop_size=CROP,
                                 patch_size=PATCH, d_model=D_MODEL, dataset_root=str(dataset), split=split,
                                 preprocessing="toy", dtype="float32",
                                 **({} if vit is None else {"n_prefix_tokens": 1, "final_norm": "layernorm"}))

        def write_cache(folder: Path, samples=samples, settings=settings) -> None:
            writer = CacheWriter(folder / CACHE_FOLDER, settings, [s.image_id for s in samples], chunk_images=4)
            for a in range(0, len(samples), 4):
                chunk = samples[a:a + 4]
                pixels = np.stack([load_sample(s, CROP)[1] for s in chunk])
                labels, purity = patch_labels(pixels, PATCH)
                acts = 0.05 * rng.standard_normal((len(chunk), 4, D_MODEL))
                for (b, p), label in np.ndenumerate(labels.reshape(len(chunk), 4)):
                    if label in SLOTS:
                        acts[b, p, SLOTS[label]] += 3.0
                tokens = []
                if tail is not None:
                    prefix = torch.from_numpy(rng.standard_normal((len(chunk), 1, D_MODEL)).astype(np.float32))
                    tokens = [prefix.numpy(), tail(prefix, torch.from_numpy(acts.astype(np.float32))).numpy()]
                writer.write_chunk(a, acts.astype(np.float32), labels, purity, pixels, *tokens)
            writer.finish()

        record_artifact(instance, storage, OutputSpec(asset, 1, {"toy": split}), write_cache)
    sae = Sae(SaeSpec("relu", D_MODEL, 12))
    W = torch.nn.functional.normalize(torch.randn(12, D_MODEL, generator=torch.Generator().manual_seed(0)), dim=1)
    W[:D_MODEL] = torch.eye(D_MODEL)
    with torch.no_grad():
        sae.W_dec_SD.copy_(W)
        sae.W_enc_SD.copy_(W)
        sae.b_enc_S.fill_(-0.5)
    record_artifact(instance, storage, OutputSpec("sae_weights", 1, {"toy": 1}),
                    lambda folder: save_sae(sae, folder, {"source": "test"}))
    weight, bias = torch.zeros(151, D_MODEL), torch.zeros(151)
    for label, slot in SLOTS.items():
        weight[label, slot] = 1.0
    record_artifact(instance, storage, OutputSpec("probe_checkpoint", 1, {"toy": 1}),
                    lambda folder: save_probe(folder, Probe(weight, bias, {"source": "test"})))
    if vit is not None:  # a probe on the final tokens, trained elsewhere (random), on the training cache
        final = Probe(torch.randn(151, D_MODEL, generator=torch.Generator().manual_seed(1)), torch.zeros(151),
                      {"source": "test", "probe_layer": "final"})
        record_artifact(instance, storage, OutputSpec("final_probe_checkpoint", 1, {"toy": 1}, {
            "train_activations": latest_key(instance, "train_activations")}), lambda folder: save_probe(folder, final))
    world = World(storage, instance)
    # baseline_metrics is an input of the reports in the graph, not in their files: a stand-in record suffices.
    instance.report_runless_asset_event(dg.AssetMaterialization("baseline_metrics", metadata={"key": "stand-in"}))
    assert world.materialize(SHARED).success
    return world


@pytest.fixture
def world(tmp_path):
    with dg.instance_for_test() as instance:
        yield write_world(tmp_path, instance)


def test_one_class_and_an_absent_class(world):
    result = world.materialize(CLASSWISE, partition_key="010_grass", run_config=RUN_CONFIG)
    assert result.success
    chosen = json.loads((world.folder("class_latents", "010_grass") / "class_latents.json").read_text())
    assert chosen["latents"][0] == SLOTS[10] and chosen["status"] == "chosen"
    # f1 and probe_aware (the probe reads grass from that direction) rank grass's own latent first; activation_sum
    # finds none, since in 24 training tokens every latent is dense.
    rankings = chosen["rankings"]
    assert rankings["f1"]["latents"][0] == rankings["probe_aware"]["latents"][0] == SLOTS[10]
    assert rankings["activation_sum"]["latents"] == [] and "no latent scores above 0" in rankings["activation_sum"][
        "reason"]
    report = read_result(world.folder("suppression_report", "010_grass") / "report.json", ClassReport)
    assert report.status == "evaluated" and list(report.selection.latents) == chosen["latents"]
    assert report.configured.latents == report.selection.latents and report.tuning.status == "tuned"
    meta = asset_metadata(result, "suppression_report", "010_grass")
    for name in (*METRIC_NAMES, "latents", "scale", "mode", "specific", "summary", "examples", "key", "tuned_mode",
                 "tuned_scale", "tuned_n_latents", "tuned_rule", "tuned_target_change_rate", "tuned_other_change_rate",
                 "tuned_specific", "tpp_score", "tuned_tpp_score", "sweep"):
        assert name in meta, name
    # The sentence, then one table of both settings with controls and intervals (no separate interval entries).
    assert list(meta)[:2] == ["result", "summary"] and meta["result"].startswith("grass: at the original setting")
    assert not [name for name in meta if "_ci_" in name]
    ci = report.configured.patch.target_change_rate_ci
    assert f"{report.configured.patch.target_change_rate:.2f} [{ci.low:.2f}, {ci.high:.2f}]" in meta["summary"]
    assert all(isinstance(meta[name], float) for name in METRIC_NAMES)
    assert meta["scale"] == -2.0 and meta["mode"] == "every_token" and isinstance(meta["specific"], bool)
    # The probe reads grass from the direction the SAE's latent 3 decodes: suppressing it changes grass patches.
    assert meta["target_change_rate"] > 0.5 and meta["target_iou_after"] < meta["target_iou_before"]
    assert "| rand. dir. target |" in meta["summary"] and "| mode |" in meta["sweep"]
    assert "data:image/png;base64" in meta["examples"]
    assert meta["legend"].startswith("colours: grass (target, outlined)") and "class-specific:" in meta[
        "specificity_rule"]
    examples = load_examples(world.folder("suppression_report", "010_grass"))
    assert examples["ground_truth"].shape == examples["baseline"].shape == examples["configured"].shape
    assert examples["ground_truth"].shape[1:] == (CROP, CROP) and examples["rgb"].shape[-1] == 3
    assert (examples["ground_truth"] == 10).any() and examples["has_rgb"].all()
    gallery = asset_metadata(result, "class_latents", "010_grass")["gallery"]
    assert "data:image/png;base64" in gallery

    absent = world.materialize(CLASSWISE, partition_key="150_flag", run_config=RUN_CONFIG)
    assert absent.success
    assert json.loads((world.folder("class_latents", "150_flag") / "class_latents.json").read_text())["latents"] == []
    meta = asset_metadata(absent, "suppression_report", "150_flag")
    assert meta["status"] == "absent_from_validation" and "reason" in meta


def test_tuning_codes_read_only_the_held_out_training_images(world, monkeypatch):
    read = []
    original = ActivationCache.read

    def recording_read(self, name, start, stop):
        read.append((self.path, start, stop))
        return original(self, name, start, stop)

    monkeypatch.setattr(ActivationCache, "read", recording_read)
    monkeypatch.setattr(ActivationCache, "iter_blocks", _reading_blocks(ActivationCache.iter_blocks, read))
    train = world.folder("train_activations") / CACHE_FOLDER
    world.storage.store.prune({"tuning_codes": set()})  # compute it afresh
    assert world.materialize([tuning_codes]).success
    meta = world.instance.get_latest_materialization_event(dg.AssetKey("tuning_codes")).asset_materialization.metadata
    spans = meta["images"].value
    assert read and {path for path, _, _ in read} == {train}  # never the validation cache
    assert {(a, b) for _, a, b in read if (a, b) != (0, 6)} <= {tuple(s) for s in spans}
    assert sum(b - a for a, b in spans) == meta["n_images"].value == 2  # the probe's held-out chunk of 6 images


def _reading_blocks(iter_blocks, read):
    def recording(self, fields=("activations",), block_images=None, start=0, stop=None):
        read.append((self.path, start, self.n_images if stop is None else stop))
        yield from iter_blocks(self, fields, block_images, start, stop)
    return recording


def test_partition_range_in_one_run_then_summary(world):
    tags = {"dagster/asset_partition_range_start": "001_wall", "dagster/asset_partition_range_end": "010_grass"}
    result = world.materialize(CLASSWISE, tags=tags, run_config=RUN_CONFIG)
    assert result.success
    keys = ["001_wall", "002_building", "003_sky", "004_floor", "005_tree", "006_ceiling", "007_road", "008_bed",
            "009_windowpane", "010_grass"]
    assert sorted(latest_keys(world.instance, "suppression_report")) == keys
    statuses = {k: asset_metadata(result, "suppression_report", k)["status"] for k in keys}
    assert statuses["010_grass"] == "evaluated" and statuses["004_floor"] == "absent_from_validation"
    assert not any(asset_metadata(result, "suppression_report", k)["reused"] for k in keys)
    # The same range again finds every report in the store and computes nothing.
    before = (world.folder("suppression_report", "010_grass") / "report.json").read_text()
    again = world.materialize(CLASSWISE, tags=tags, run_config=RUN_CONFIG)
    assert again.success and all(asset_metadata(again, "suppression_report", k)["reused"] for k in keys)
    assert (world.folder("suppression_report", "010_grass") / "report.json").read_text() == before

    summary = world.materialize([suppression_summary])
    assert summary.success
    meta = asset_metadata(summary, "suppression_summary")
    evaluated = [k for k, s in statuses.items() if s == "evaluated"]
    assert meta["n_classes_evaluated"] == len(evaluated) >= 2
    for name in ("n_specific", "n_specific_tuned", "tuned_mode", "tuned_scale", "tuned_n_latents", "tuned_rule",
                 "mean_tpp_score", "mean_tuned_tpp_score", "n_specific_oracle", "per_rule", "classes", "classes_tuned",
                 "specificity", "class_examples", "path", "n_absent_from_validation", "n_without_latents",
                 "n_stale", "figures"):
        assert name in meta, name
    assert list(meta)[0] == "result" and meta["result"].startswith("At the original setting (-2 x max on every token")
    folder = world.folder("suppression_summary")
    assert (folder / "summary.csv").exists() and (Path(meta["path"]) / "report.html").is_file()
    assert list(meta)[-3:] == ["key", "path", "reused"]  # the one path last: the headline is never cut off
    # The classes table: one row per evaluated class; every number of the metadata at 4 significant digits.
    rows = read_result(folder / "classes.json", ClassTable).rows
    assert [r.class_key for r in rows] == evaluated
    assert meta["classes"].splitlines()[0].startswith("| class | patches | target | other |")
    assert all(f"| {key} |" in meta["classes"] for key in evaluated)
    floats = [v for v in meta.values() if isinstance(v, float)]
    assert floats and all(v == float(f"{v:.4g}") for v in floats)
    page = (folder / "report.html").read_text()
    assert meta["result"] in page and "http" not in page and page.count("<img ") >= 4 + 3 * len(evaluated)
    # The answer where a reader looks: a stable link to the latest report, and the headline with both paths.
    assert (world.storage.root / "report.html").resolve() == folder / "report.html"
    said = answer(world.instance, world.storage.root, demo=True)
    assert said.startswith(meta["result"]) and str(folder / "report.html") in said and "not ADE20K" in said
    assert str(world.storage.root / "report.html") in said


def test_the_evaluated_check_passes_per_evaluated_class_and_skips_absent_ones(world):
    """One check result per evaluated class in a run over a range of classes, pointing at that class's new
    materialization; absent classes get none, so Dagster shows their planned check as skipped."""
    tags = {"dagster/asset_partition_range_start": "003_sky", "dagster/asset_partition_range_end": "010_grass"}
    result = world.materialize([*CLASSWISE, suppression_report_evaluated], tags=tags, run_config=RUN_CONFIG)
    assert result.success
    evaluations = {e.partition: e for e in result.get_asset_check_evaluations()}
    statuses = {k: asset_metadata(result, "suppression_report", k)["status"] for k in latest_keys(
        world.instance, "suppression_report")}
    assert set(evaluations) == {k for k, s in statuses.items() if s == "evaluated"} and "010_grass" in evaluations
    assert "004_floor" not in evaluations and statuses["004_floor"] == "absent_from_validation"
    grass = evaluations["010_grass"]
    record = world.instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=suppression_report.key, asset_partitions=["010_grass"]), limit=1).records[0]
    assert grass.passed and grass.target_materialization_data.storage_id == record.storage_id
    assert grass.description.startswith("grass: at the original setting")


def test_class_latents_of_older_statistics_fail_before_any_report_is_written(world):
    assert world.materialize(CLASSWISE, partition_key="010_grass", run_config=RUN_CONFIG).success
    report_key = latest_key(world.instance, "suppression_report", "010_grass")
    # New statistics (another purity): the class's latents were chosen from the old ones.
    assert world.materialize([latent_stats], run_config={"ops": {"latent_stats": {"config": {"purity": 0.5}}}}).success
    result = world.materialize([suppression_report], partition_key="010_grass", raise_on_error=False)
    assert not result.success
    error = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    assert "class_latents of 010_grass were chosen from other latent statistics" in (error.cause or error).message
    assert world.storage.store.keys("suppression_report") == [report_key]
    assert latest_key(world.instance, "suppression_report", "010_grass") == report_key


def test_changing_a_setting_reruns_that_asset_and_switching_back_reuses(world):
    """A changed selection rule gives new class latents and reports; the shared inputs are untouched; the old
    setting again finds its folders."""
    run = lambda config: world.materialize(CLASSWISE, partition_key="010_grass",  # noqa: E731
                                           run_config={"ops": {"class_latents": {"config": config}}})
    first = run({"rule": "f1"})
    second = run({"rule": "activation_sum", "dense_frequency": 1.0})
    keys = lambda result: {a: asset_metadata(result, a, "010_grass")["key"] for a in  # noqa: E731
                           ("class_latents", "suppression_report")}
    assert all(k1 != k2 for k1, k2 in zip(keys(first).values(), keys(second).values()))
    back = run({"rule": "f1"})
    assert keys(back) == keys(first)
    assert all(asset_metadata(back, a, "010_grass")["reused"] for a in ("class_latents", "suppression_report"))


@pytest.mark.slow
def test_cli_partition_range_over_all_classes(tmp_path, monkeypatch):
    """`dagster asset materialize --partition-range 001_wall...150_flag` runs all 150 classes in one run."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        world = write_world(tmp_path, instance)
    defs_file = tmp_path / "defs.py"
    defs_file.write_text(textwrap.dedent(f"""
        import dagster as dg
        from saeseg_assets.assets import codes, latents, reports, summary
        from saeseg_assets.resources import Compute, Storage
        defs = dg.Definitions(assets=dg.load_assets_from_modules([latents, codes, reports, summary]),
                              resources={{"storage": Storage(data_dir={str(world.storage.root)!r}),
                                         "compute": Compute()}})
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAESEG_", "DAGSTER_"))}
    env["DAGSTER_HOME"] = str(home)
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster), "asset", "materialize", "-f", str(defs_file), "--select",
               "class_latents,suppression_report", "--partition-range", "001_wall...150_flag"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with dg.DagsterInstance.get() as instance:
        for asset in ("class_latents", "suppression_report"):
            keys = latest_keys(instance, asset)
            assert len(keys) == 150 and len(set(keys.values())) == 1  # one run, one key
            assert len(list(world.storage.store.path(asset, keys["001_wall"]).iterdir())) == 150


def test_both_mechanisms_side_by_side(tmp_path):
    """A class studied under shortcut and under propagate (through a real saved two-block ViT's tail), and the summary
    that sets them side by side."""
    import transformers

    from saeseg_assets.assets.reports import propagated_report
    from saeseg_assets.core.data.backbone import load_backbone
    from saeseg_assets.core.data.tail import BackboneTail
    from saeseg_assets.core.probe.metrics import grid_logits, pixel_predictions
    from saeseg_assets.core.probe.model import load_probe
    from saeseg_assets.core.report.results import MechanismComparison

    torch.manual_seed(0)
    vit = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=2, intermediate_size=4 * D_MODEL,
        patch_size=PATCH, image_size=CROP))
    vit.save_pretrained(tmp_path / "vit")
    with dg.instance_for_test() as instance:
        world = write_world(tmp_path, instance, vit=tmp_path / "vit")
        studied = world.materialize([class_latents, suppression_report, propagated_report],
                                    partition_key="010_grass", run_config=RUN_CONFIG)
        assert studied.success
        assert world.materialize([suppression_summary]).success
        shortcut = read_result(world.folder("suppression_report", "010_grass") / "report.json", ClassReport)
        propagate = read_result(world.folder("propagated_report", "010_grass") / "report.json", ClassReport)
        summary = world.folder("suppression_summary")
        words = {asset: asset_metadata(studied, asset, "010_grass")["mechanism"]
                 for asset in ("suppression_report", "propagated_report")}
        val = ActivationCache(world.folder("val_activations") / CACHE_FOLDER)
        probe = load_probe(world.folder("final_probe_checkpoint"))
    assert (shortcut.config.mechanism, propagate.config.mechanism) == ("shortcut", "propagate")
    assert "shortcut: the edit at the SAE's layer" in words["suppression_report"]
    assert "propagate: the edit at the SAE's layer carried through" in words["propagated_report"]
    assert propagate.status == "evaluated" and propagate.selection == shortcut.selection
    assert propagate.dose_response == () and shortcut.dose_response  # no validation sweep under propagate
    configured = propagate.configured.patch
    assert configured.random_latents is not None and configured.random_direction is not None
    assert configured.target_change_rate_ci is not None and propagate.tuning.status == "tuned"
    # Its baseline is the final probe after the tail on the recorded tokens: the grass IoU computed here by hand.
    tail = BackboneTail.of(load_backbone(str(tmp_path / "vit"), tmp_path), layer=0)
    final_BPD = tail(torch.from_numpy(val.read("prefix_tokens", 0, 3)), torch.from_numpy(val.read("activations", 0, 3)))
    pred_BHW = pixel_predictions(grid_logits(final_BPD @ probe.weight_CD.T + probe.bias_C, 2), CROP)
    labels_BHW = torch.from_numpy(val.read("pixel_labels", 0, 3))
    hit, gt, pred = ((pred_BHW == 10) & (labels_BHW == 10)).sum(), (labels_BHW == 10).sum(), \
        ((pred_BHW == 10) & (labels_BHW != 0)).sum()
    assert propagate.configured.pixels.target_iou_before == pytest.approx(float(hit / (gt + pred - hit)))
    comparison = read_result(summary / "mechanisms.json", MechanismComparison)
    assert comparison.n_classes == 1 and comparison.rows[0].class_key == "010_grass"
    assert comparison.rows[0].propagate == configured and comparison.rows[0].shortcut == shortcut.configured.patch
    assert comparison.n_specific_shortcut == int(shortcut.specific)
    assert comparison.n_specific_propagate == int(propagate.specific)
    html = (summary / "report.html").read_text()
    assert "010_grass under propagate" in html and html.count("Mechanism of the figures") == 2
    assert (summary / "mechanisms.png").read_bytes()[:4] == b"\x89PNG"
