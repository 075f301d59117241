"""Tests of the ADE20K class table, split listing, sample loading and patch labels.
Every test makes its own tiny dataset; the real three-image sample is used when it lies beside the repository."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saeseg_assets.core.data.ade20k import (
    CLASSES,
    N_CLASSES,
    DatasetError,
    Sample,
    check_split,
    class_by_index,
    class_by_key,
    dataset_fingerprint,
    describe_preprocessing,
    find_dataset_root,
    list_split,
    load_sample,
    patch_labels,
)


def make_split(root: Path, split: str = "validation", stems: tuple[str, ...] = ("ADE_val_00000001",),
               size: tuple[int, int] = (32, 24)) -> Path:
    """A valid split of grey images and all-wall masks; tests then break one thing."""
    for stem in stems:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (90, 120, 150)).save(root / "images" / split / f"{stem}.jpg")
        Image.new("L", size, 1).save(root / "annotations" / split / f"{stem}.png")
    return root


def sample_of(image: Image.Image, annotation: Image.Image, tmp_path: Path, suffix: str = ".png") -> Sample:
    image_path, annotation_path = tmp_path / f"img{suffix}", tmp_path / "ann.png"
    image.save(image_path)
    annotation.save(annotation_path)
    return Sample("img", image_path, annotation_path)


# ---- class table -------------------------------------------------------------------------------------------------

def test_class_table_has_150_rows_in_mask_value_order():
    assert len(CLASSES) == N_CLASSES == 150
    assert [c.index for c in CLASSES] == list(range(1, 151))
    assert class_by_index(1).name == "wall"
    assert class_by_index(29).name == "rug"  # the index trap: mask value 29 is rug, not field
    assert class_by_index(30).name == "field"
    assert class_by_index(2).names == ("building", "edifice")


def test_partition_keys_follow_the_nnn_slug_rule():
    keys = {i: class_by_index(i).key for i in (1, 10, 21, 29, 150)}
    assert keys == {1: "001_wall", 10: "010_grass", 21: "021_car", 29: "029_rug", 150: "150_flag"}
    assert class_by_index(47).key == "047_sand"
    assert len({c.key for c in CLASSES}) == 150


def test_every_key_round_trips_to_its_index():
    for c in CLASSES:
        assert class_by_key(c.key) is c
        assert class_by_index(c.index) is c


@pytest.mark.parametrize("key", ["029_carpet", "wall", "151_x", "", None])
def test_unknown_key_is_a_clear_key_error(key):
    with pytest.raises(KeyError, match="unknown ADE20K class key"):
        class_by_key(key)


@pytest.mark.parametrize("index", [0, 151, -1, True, 1.0])
def test_index_outside_1_to_150_is_refused(index):
    with pytest.raises(ValueError, match="1..150"):
        class_by_index(index)


# ---- listing a split ---------------------------------------------------------------------------------------------

def test_list_split_pairs_and_sorts(tmp_path):
    make_split(tmp_path, stems=("ADE_val_00000002", "ADE_val_00000001"))
    (tmp_path / "images" / "validation" / ".DS_Store").write_bytes(b"junk")
    samples = list_split(tmp_path, "validation")
    assert [s.image_id for s in samples] == ["ADE_val_00000001", "ADE_val_00000002"]
    assert samples[0].annotation_path == tmp_path / "annotations" / "validation" / "ADE_val_00000001.png"


def test_root_may_be_the_dataset_folder_or_its_parent(tmp_path):
    make_split(tmp_path / "ADEChallengeData2016")
    assert find_dataset_root(tmp_path) == tmp_path / "ADEChallengeData2016"
    assert find_dataset_root(tmp_path / "ADEChallengeData2016") == tmp_path / "ADEChallengeData2016"
    assert len(list_split(tmp_path, "validation")) == 1


def test_missing_root_is_named(tmp_path):
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        list_split(tmp_path / "nowhere", "validation")


def test_missing_split_folder_is_named(tmp_path):
    make_split(tmp_path, split="validation")
    with pytest.raises(DatasetError, match=r"images/training is missing"):
        list_split(tmp_path, "training")
    (tmp_path / "images" / "training").mkdir()
    with pytest.raises(DatasetError, match=r"annotations/training is missing"):
        list_split(tmp_path, "training")


def test_image_without_annotation_is_named(tmp_path):
    make_split(tmp_path, stems=("ADE_val_00000001", "ADE_val_00000002"))
    (tmp_path / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    with pytest.raises(DatasetError, match="no annotation for image.*ADE_val_00000002"):
        list_split(tmp_path, "validation")


def test_annotation_without_image_is_named(tmp_path):
    make_split(tmp_path, stems=("ADE_val_00000001", "ADE_val_00000002"))
    (tmp_path / "images" / "validation" / "ADE_val_00000001.jpg").unlink()
    with pytest.raises(DatasetError, match="no image for annotation.*ADE_val_00000001"):
        list_split(tmp_path, "validation")


def test_empty_split_is_refused(tmp_path):
    (tmp_path / "images" / "validation").mkdir(parents=True)
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty"):
        list_split(tmp_path, "validation")


def test_unknown_split_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        list_split(make_split(tmp_path), "val")


# ---- bad files ---------------------------------------------------------------------------------------------------

def test_rgb_annotation_is_refused(tmp_path):
    sample = sample_of(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (1, 1, 1)), tmp_path)
    with pytest.raises(DatasetError, match="ann.png must be a single-channel 8-bit PNG.*mode RGB"):
        load_sample(sample, 4)


def test_16_bit_annotation_is_refused(tmp_path):
    mask = Image.fromarray(np.full((8, 8), 3, dtype=np.uint16))
    sample = sample_of(Image.new("RGB", (8, 8)), mask, tmp_path)
    with pytest.raises(DatasetError, match="ann.png must be a single-channel 8-bit PNG.*I;16"):
        load_sample(sample, 4)


def test_palette_annotation_is_refused(tmp_path):
    sample = sample_of(Image.new("RGB", (8, 8)), Image.new("P", (8, 8), 2), tmp_path)
    with pytest.raises(DatasetError, match="mode P"):
        load_sample(sample, 4)


def test_annotation_value_above_150_is_refused(tmp_path):
    labels = np.ones((8, 8), dtype=np.uint8)
    labels[3, 4] = 200
    sample = sample_of(Image.new("RGB", (8, 8)), Image.fromarray(labels), tmp_path)
    with pytest.raises(DatasetError, match="ann.png holds value 200"):
        load_sample(sample, 4)


def test_truncated_jpeg_is_refused(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    sample = sample_of(Image.fromarray(noise), Image.new("L", (64, 64), 1), tmp_path, suffix=".jpg")
    data = sample.image_path.read_bytes()
    sample.image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="img.jpg cannot be read.*truncated"):
        load_sample(sample, 32)


def test_garbage_image_is_refused(tmp_path):
    sample = sample_of(Image.new("RGB", (8, 8)), Image.new("L", (8, 8), 1), tmp_path, suffix=".jpg")
    sample.image_path.write_bytes(b"this is not a picture " * 20)
    with pytest.raises(DatasetError, match="image .*img.jpg cannot be read"):
        load_sample(sample, 4)


def test_size_mismatch_is_refused(tmp_path):
    sample = sample_of(Image.new("RGB", (10, 8)), Image.new("L", (8, 10), 1), tmp_path)
    with pytest.raises(DatasetError, match="is 10x8 but its annotation .*ann.png is 8x10"):
        load_sample(sample, 4)


def test_the_up_front_pass_names_a_bad_annotation_or_size_and_leaves_image_decoding_to_the_recording(tmp_path):
    stems = ("ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003")
    samples = list_split(make_split(tmp_path, stems=stems), "validation")
    check_split(samples)
    image = samples[2].image_path
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(image)
    image.write_bytes(image.read_bytes()[:1000])  # truncated: its header still reads; decoding it fails
    check_split(samples)
    with pytest.raises(DatasetError, match="ADE_val_00000003.jpg cannot be read"):
        load_sample(samples[2], 16)
    labels = np.ones((24, 32), dtype=np.uint8)
    labels[5, 6] = 151
    Image.fromarray(labels).save(samples[1].annotation_path)
    with pytest.raises(DatasetError, match="ADE_val_00000002.png holds value 151"):
        check_split(samples)
    Image.new("L", (24, 32), 1).save(samples[0].annotation_path)  # both bad: the first in id order is named
    with pytest.raises(DatasetError, match="ADE_val_00000001.jpg is 32x24 but its annotation .*ADE_val_00000001.png"):
        check_split(samples)


def test_the_dataset_fingerprint_follows_file_contents_not_folders_or_times(tmp_path):
    def fingerprint(root: Path) -> str:
        return dataset_fingerprint({split: list_split(root, split) for split in ("training", "validation")})

    def dataset(root: Path) -> Path:
        make_split(root, "training", ("ADE_train_00000001", "ADE_train_00000002"))
        return make_split(root, "validation", ("ADE_val_00000001",))

    first, copy = dataset(tmp_path / "a"), dataset(tmp_path / "b")
    assert len(fingerprint(first)) == 16 and fingerprint(first) == fingerprint(copy)
    annotation = copy / "annotations" / "training" / "ADE_train_00000002.png"
    annotation.touch()  # a new modification time, same bytes
    assert fingerprint(copy) == fingerprint(first)
    Image.new("L", (32, 24), 2).save(annotation)  # same name, same size, other labels
    assert fingerprint(copy) != fingerprint(first)
    Image.new("L", (32, 24), 1).save(annotation)  # the old bytes back
    assert fingerprint(copy) == fingerprint(first)
    (copy / "images" / "validation" / "ADE_val_00000001.jpg").write_bytes(b"x")
    assert fingerprint(copy) != fingerprint(first)


# ---- colour modes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, colour, expected", [
    ("L", 77, (77, 77, 77)),
    ("P", None, (200, 10, 10)),
    ("RGBA", (30, 60, 90, 128), (30, 60, 90)),
    ("1", 1, (255, 255, 255)),
])
def test_lossless_modes_convert_to_rgb(tmp_path, mode, colour, expected):
    if mode == "P":
        image = Image.new("RGB", (12, 12), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = Image.new(mode, (12, 12), colour)
    image_HW3, _ = load_sample(sample_of(image, Image.new("L", (12, 12), 3), tmp_path), 6)
    assert image_HW3.shape == (6, 6, 3) and image_HW3.dtype == np.uint8
    assert (image_HW3 == expected).all()


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in print colours
    image_HW3, _ = load_sample(sample_of(image, Image.new("L", (16, 16), 3), tmp_path, suffix=".jpg"), 8)
    assert image_HW3.shape == (8, 8, 3)
    assert np.allclose(image_HW3.reshape(-1, 3).mean(axis=0), (255, 0, 0), atol=6)


def test_16_bit_grey_image_is_scaled_not_clipped(tmp_path):
    grey = Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16))
    image_HW3, _ = load_sample(sample_of(grey, Image.new("L", (8, 8), 3), tmp_path), 4)
    assert (image_HW3 == 100).all()


# ---- geometry ----------------------------------------------------------------------------------------------------

def coordinate_mask(width: int, height: int) -> np.ndarray:
    """Each pixel holds 10 * row + column, so a value tells where it came from."""
    return (10 * np.arange(height)[:, None] + np.arange(width)[None, :]).astype(np.uint8)


def test_geometry_halving(tmp_path):
    # 8x4 -> short side 2: resized 4x2, nearest source = floor((x + 0.5) * 2) -> cols 1,3,5,7 and rows 1,3;
    # centre crop starts at column (4 - 2) // 2 = 1 -> source cols 3, 5.
    sample = sample_of(Image.new("RGB", (8, 4)), Image.fromarray(coordinate_mask(8, 4)), tmp_path)
    _, labels = load_sample(sample, 2)
    assert labels.tolist() == [[13, 15], [33, 35]]


def test_geometry_non_integer_scale(tmp_path):
    # 10x5 -> short side 3: scale 0.6, resized 6x3, crop columns 1..3.
    # source col = floor((x + 0.5) * 10 / 6) for x = 1, 2, 3 -> 2, 4, 5;
    # source row = floor((y + 0.5) * 5 / 3) for y = 0, 1, 2 -> 0, 2, 4
    sample = sample_of(Image.new("RGB", (10, 5)), Image.fromarray(coordinate_mask(10, 5)), tmp_path)
    _, labels = load_sample(sample, 3)
    assert labels.tolist() == [[2, 4, 5], [22, 24, 25], [42, 44, 45]]


def test_nearest_neighbour_keeps_only_existing_labels(tmp_path):
    labels = np.random.default_rng(1).choice([0, 3, 29, 150], size=(37, 53)).astype(np.uint8)
    sample = sample_of(Image.new("RGB", (53, 37)), Image.fromarray(labels), tmp_path)
    _, out = load_sample(sample, 24)
    assert out.shape == (24, 24)
    assert set(np.unique(out)) <= {0, 3, 29, 150}


def test_image_and_mask_share_the_geometry(tmp_path):
    # 40x20, class border at source column 24; crop 10: scale 0.5, resized 20x10, crop columns 5..14, so
    # the border lands between crop columns 6 (source 23) and 7 (source 25), in the image and the mask alike.
    labels = np.ones((20, 40), dtype=np.uint8)
    labels[:, 24:] = 2
    pixels = np.where(labels[..., None] == 1, 0, 255).repeat(3, axis=2).astype(np.uint8)
    image_HW3, out = load_sample(sample_of(Image.fromarray(pixels), Image.fromarray(labels), tmp_path), 10)
    assert (out[:, :7] == 1).all() and (out[:, 7:] == 2).all()
    grey = image_HW3[..., 0].astype(int)
    assert (grey[:, :6] < 40).all() and (grey[:, 8:] > 215).all()


def test_describe_preprocessing_names_the_crop():
    text = describe_preprocessing(224)
    assert "224" in text and "bicubic" in text and "nearest" in text and "\n" not in text


# ---- patch labels ------------------------------------------------------------------------------------------------

def test_patch_labels_by_hand():
    labels = np.array([[1, 1, 2, 2],
                       [1, 3, 2, 2],
                       [0, 0, 5, 4],
                       [0, 5, 4, 5]], dtype=np.uint8)
    majority, purity = patch_labels(labels, 2)
    # bottom-left: three 0s beat one 5 (0 is a label too); bottom-right: 4 and 5 tie -> the smaller, 4
    assert majority.tolist() == [[1, 2], [0, 4]] and majority.dtype == np.uint8
    assert purity.tolist() == [[0.75, 1.0], [0.75, 0.5]] and purity.dtype == np.float32


def test_patch_labels_on_a_batch_equal_one_by_one():
    batch = np.random.default_rng(2).integers(0, 6, size=(3, 28, 42)).astype(np.uint8)
    majority, purity = patch_labels(batch, 14)
    assert majority.shape == purity.shape == (3, 2, 3)
    for b in range(3):
        one_majority, one_purity = patch_labels(batch[b], 14)
        assert (majority[b] == one_majority).all() and (purity[b] == one_purity).all()


def test_patch_labels_refuse_a_map_that_does_not_split():
    with pytest.raises(ValueError, match="does not split"):
        patch_labels(np.zeros((10, 14), dtype=np.uint8), 14)


# ---- the real sample ---------------------------------------------------------------------------------------------

def test_real_sample_reads(ade20k_sample):
    samples = list_split(ade20k_sample, "validation")
    assert [s.image_id for s in samples] == [f"ADE_val_0000000{i}" for i in (1, 2, 3)]
    for sample in samples:
        image_HW3, labels_HW = load_sample(sample)
        assert image_HW3.shape == (224, 224, 3) and image_HW3.dtype == np.uint8
        assert labels_HW.shape == (224, 224) and labels_HW.dtype == np.uint8
        original = set(np.unique(np.asarray(Image.open(sample.annotation_path))).tolist())
        kept = set(np.unique(labels_HW).tolist())
        assert kept <= original and max(kept) <= 150
        assert {1, 3} <= kept  # every sample shows wall and sky after the crop
