"""Tests of the embedded demo dataset: honest sources, disjoint splits, determinism, and a readable ADE20K layout.
Small sets only; the default size is exercised by the pipeline itself."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saeseg_assets.core.data.ade20k import (
    DatasetError,
    class_by_index,
    list_split,
    load_sample,
)
from saeseg_assets.core.data.demo_data import (
    DEMO_CLASSES,
    MANIFEST,
    SOURCES,
    iter_demo_images,
    source_path,
    write_demo_dataset,
)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def box_mask(size: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=bool)
    for left, top, right, bottom in boxes:
        mask[top:bottom, left:right] = True
    return mask


# ---- the source table --------------------------------------------------------------------------------------------

def test_source_classes_are_the_intended_ade_classes():
    names = {class_by_index(i).name for i in DEMO_CLASSES}
    assert len(DEMO_CLASSES) >= 8 and {1, 10} <= set(DEMO_CLASSES)
    assert {"wall", "grass", "sky", "person", "flower", "animal", "minibike"} <= names
    for source in SOURCES:
        if source.class_key is not None:
            assert class_by_index(source.class_index).key == source.class_key


def test_source_boxes_lie_inside_their_photos_and_never_overlap():
    by_file = defaultdict(list)
    for source in SOURCES:
        by_file[source_path(source)].append(source.box)
    for path, boxes in by_file.items():
        assert path.is_file(), f"{path} is not inside the installed package"
        with Image.open(path) as photo:
            size = photo.size
        for left, top, right, bottom in boxes:
            assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1], (path, boxes)
        # overlapping boxes would give one source pixel two labels
        assert box_mask(size, boxes).sum() == sum((r - l) * (b - t) for l, t, r, b in boxes), path


def test_train_and_validation_parts_split_each_box():
    for source in SOURCES:
        left, top, right, bottom = source.box
        train = box_mask((right, bottom), [source.part("training")])
        val = box_mask((right, bottom), [source.part("validation")])
        assert not (train & val).any()
        assert (train | val).sum() == (right - left) * (bottom - top)
        assert train.sum() > val.sum() > 0


# ---- composed images ---------------------------------------------------------------------------------------------

def test_no_source_pixel_is_used_by_both_splits():
    used = {"training": defaultdict(list), "validation": defaultdict(list)}
    for demo in iter_demo_images(n_train=60, n_val=20, seed=0):
        for crop in demo.crops:
            part = crop.source.part(demo.split)
            assert part[0] <= crop.box[0] < crop.box[2] <= part[2] and part[1] <= crop.box[1] < crop.box[3] <= part[3]
            used[demo.split][crop.source.file].append(crop.box)
    for file in used["training"].keys() & used["validation"].keys():
        size = (1000, 1000)
        overlap = box_mask(size, used["training"][file]) & box_mask(size, used["validation"][file])
        assert not overlap.any(), file


def test_images_cover_the_demo_classes_with_varied_sizes_and_some_grey():
    seen, sizes, modes = set(), set(), set()
    for demo in iter_demo_images(n_train=40, n_val=10, seed=0):
        assert demo.labels_HW.shape == (demo.image.height, demo.image.width)
        seen |= set(np.unique(demo.labels_HW).tolist())
        sizes.add(demo.image.size)
        modes.add(demo.image.mode)
        assert all(256 <= side <= 448 for side in demo.image.size)
    assert {1, 10} <= seen and len(seen - {0}) >= 8
    assert len(sizes) > 30 and modes == {"RGB", "L"}


# ---- the written set ---------------------------------------------------------------------------------------------

def test_same_arguments_give_the_same_bytes(tmp_path):
    first = write_demo_dataset(tmp_path / "a", n_train=6, n_val=3, seed=5)
    second = write_demo_dataset(tmp_path / "b", n_train=6, n_val=3, seed=5)
    assert tree_digest(first) == tree_digest(second)
    other = write_demo_dataset(tmp_path / "c", n_train=6, n_val=3, seed=6)
    assert tree_digest(other) != tree_digest(first)


def test_written_set_reads_back_through_the_reader(tmp_path):
    root = write_demo_dataset(tmp_path, n_train=8, n_val=4, seed=0)
    assert root == tmp_path / "ADEChallengeData2016"
    assert [p.name for p in tmp_path.iterdir()] == ["ADEChallengeData2016"]  # no building folder left behind
    for split, count in (("training", 8), ("validation", 4)):
        samples = list_split(tmp_path, split)
        assert len(samples) == count
        assert samples[0].image_id == ("ADE_train_00000001" if split == "training" else "ADE_val_00000001")
        for sample in samples:
            image_HW3, labels_HW = load_sample(sample, 112)
            assert image_HW3.shape == (112, 112, 3) and labels_HW.max() <= 150
            assert Image.open(sample.annotation_path).mode == "L"
    info = (root / "objectInfo150.txt").read_text().splitlines()
    assert info[0] == "Idx\tRatio\tTrain\tVal\tName" and len(info) == 151
    assert info[2].endswith("\tbuilding, edifice")
    masks = [np.asarray(Image.open(a)) for a in sorted(root.glob("annotations/*/*.png"))]
    labelled = sum(int((m > 0).sum()) for m in masks) / sum(m.size for m in masks)
    assert abs(sum(float(line.split("\t")[1]) for line in info[1:]) - labelled) < 0.01  # Ratio leaves out label 0
    readme = (root / "README.txt").read_text()
    assert "NOT ADE20K" in readme and "skimage" in readme and "010_grass" in readme


def test_a_complete_set_is_reused_and_other_arguments_replace_it(tmp_path):
    root = write_demo_dataset(tmp_path, n_train=3, n_val=2, seed=0)
    stamp = (root / MANIFEST).stat().st_mtime_ns
    assert write_demo_dataset(tmp_path, n_train=3, n_val=2, seed=0) == root
    assert (root / MANIFEST).stat().st_mtime_ns == stamp
    write_demo_dataset(tmp_path, n_train=4, n_val=2, seed=0)
    assert json.loads((root / MANIFEST).read_text())["n_train"] == 4
    assert len(list_split(tmp_path, "training")) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["ADEChallengeData2016"]


def test_a_folder_that_is_not_a_demo_set_is_never_overwritten(tmp_path):
    real = tmp_path / "ADEChallengeData2016" / "images"
    real.mkdir(parents=True)
    with pytest.raises(DatasetError, match="not a saeseg demo set"):
        write_demo_dataset(tmp_path, n_train=2, n_val=1)
    assert real.is_dir()
