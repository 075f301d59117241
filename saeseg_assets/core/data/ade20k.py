"""The ADE20K SceneParsing class table, and the reader that lists, validates and preprocesses its samples.
Pure Python/numpy/Pillow: pixel labels follow the mask values of ADEChallengeData2016 (0 = other, 1..150 = classes)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

N_CLASSES = 150
SPLITS = ("training", "validation")
DATASET_FOLDER = "ADEChallengeData2016"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_TABLE_FILE = "ade20k_classes.tsv"


class DatasetError(ValueError):
    """Bad input data; the message names the file or folder and what is wrong with it."""


# ---------------------------------------------------------------------------------------------------------------
# The class table


@dataclass(frozen=True)
class AdeClass:
    index: int  # the mask value, 1..150 (the Idx column of objectInfo150.txt)
    names: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def key(self) -> str:
        """Partition key `NNN_slug`: runs of non-alphanumerics become one `_`, none at the ends (`029_rug`)."""
        slug = re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")
        return f"{self.index:03d}_{slug}"


def class_table_version() -> str:
    """A name for the class table's exact content, written into probe checkpoints."""
    text = (resources.files(__package__) / _TABLE_FILE).read_bytes()
    return "ade20k-150-" + hashlib.sha256(text).hexdigest()[:12]


def _load_classes() -> tuple[AdeClass, ...]:
    text = (resources.files(__package__) / _TABLE_FILE).read_text(encoding="utf-8")
    classes = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        index, names = line.split("\t", 1)
        classes.append(AdeClass(int(index), tuple(n.strip() for n in names.split(","))))
    # The table is the single source of every index in the project: a broken one must fail loudly at import.
    if [c.index for c in classes] != list(range(1, N_CLASSES + 1)):
        raise RuntimeError(f"{_TABLE_FILE} must list the classes 1..{N_CLASSES} in order")
    if len({c.key for c in classes}) != N_CLASSES:
        raise RuntimeError(f"{_TABLE_FILE} gives two classes the same partition key")
    return tuple(classes)


CLASSES: tuple[AdeClass, ...] = _load_classes()
_BY_KEY = {c.key: c for c in CLASSES}


def class_by_index(index: int) -> AdeClass:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 1 <= index <= N_CLASSES:
        raise ValueError(f"ADE20K class index must be an integer in 1..{N_CLASSES} (0 is 'other'), got {index!r}")
    return CLASSES[int(index) - 1]


def class_by_key(key: str) -> AdeClass:
    try:
        return _BY_KEY[key]
    except (KeyError, TypeError):
        raise KeyError(f"unknown ADE20K class key {key!r}; keys look like '001_wall' .. '150_flag'") from None


# ---------------------------------------------------------------------------------------------------------------
# Listing a split


@dataclass(frozen=True)
class Sample:
    image_id: str  # the file stem, e.g. "ADE_val_00000001"
    image_path: Path
    annotation_path: Path


def find_dataset_root(root: Path | str) -> Path:
    """Accepts the ADEChallengeData2016 folder itself or a folder that holds it."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    if (root / "images").is_dir() or (root / "annotations").is_dir():
        return root
    if (root / DATASET_FOLDER).is_dir():
        return root / DATASET_FOLDER
    raise DatasetError(f"{root} holds neither images/ and annotations/ nor an {DATASET_FOLDER}/ folder")


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in folder.iterdir():
        # Hidden files (.DS_Store, editor droppings) and non-image files are not samples.
        if path.name.startswith(".") or path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if path.stem in files:
            raise DatasetError(f"{folder} holds two files for {path.stem}: {files[path.stem].name} and {path.name}")
        files[path.stem] = path
    return files


def _name_some(stems: set[str]) -> str:
    shown = sorted(stems)[:5]
    return ", ".join(shown) + (f" and {len(stems) - len(shown)} more" if len(stems) > len(shown) else "")


def list_split(root: Path | str, split: str) -> list[Sample]:
    """All (image, annotation) pairs of a split, sorted by id; checks pairing only, not file contents."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = find_dataset_root(root)
    image_dir, annotation_dir = root / "images" / split, root / "annotations" / split
    for folder in (image_dir, annotation_dir):
        if not folder.is_dir():
            raise DatasetError(f"split folder {folder} is missing")
    images = _files_by_stem(image_dir, IMAGE_SUFFIXES)
    annotations = _files_by_stem(annotation_dir, (".png",))
    if missing := set(images) - set(annotations):
        raise DatasetError(f"{annotation_dir}: no annotation for image(s) {_name_some(missing)}")
    if orphans := set(annotations) - set(images):
        raise DatasetError(f"{image_dir}: no image for annotation(s) {_name_some(orphans)}")
    if not images:
        raise DatasetError(f"split {split!r} under {root} is empty: no images in {image_dir}")
    return [Sample(stem, images[stem], annotations[stem]) for stem in sorted(images)]


def _each(function, items: Sequence) -> list:
    # Threads: hashing and PNG decoding release the GIL; the first error (in item order) is raised.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(function, items))


def dataset_fingerprint(samples: Mapping[str, Sequence[Sample]]) -> str:
    """16 hex digits of blake2b over every split's image ids and the bytes of every image and annotation: equal for
    datasets whose files are equal byte for byte, whatever their folder or modification times."""
    def digest(path: Path) -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "blake2b").hexdigest()

    total = hashlib.blake2b(digest_size=8)
    for split in sorted(samples):
        files = [path for s in samples[split] for path in (s.image_path, s.annotation_path)]
        digests = iter(_each(digest, files))
        for s in samples[split]:
            total.update(f"{split}\t{s.image_id}\t{next(digests)}\t{next(digests)}\n".encode())
    return total.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Loading one sample


def describe_preprocessing(crop_size: int) -> str:
    return (f"image -> 8-bit RGB (16-bit grey /257, alpha dropped, EXIF orientation ignored); resize so the short "
            f"side is {crop_size} px (image bicubic, mask nearest neighbour, same target size); centre crop "
            f"{crop_size}x{crop_size} (offset floor((side-{crop_size})/2))")


def _open_image(path: Path, what: str, decode: bool = True) -> Image.Image:
    # load() forces the whole decode so a truncated file fails here, not later inside a batch.
    try:
        image = Image.open(path)
        if decode:
            image.load()
    except FileNotFoundError:
        raise DatasetError(f"{what} {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{what} {path} cannot be read: {error}") from None
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        # Pillow clips wide grey values to 255 when converting; rescale 16-bit grey instead.
        grey = np.asarray(image, dtype=np.float64)
        if grey.max(initial=0) > 255:
            grey = grey / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _check_annotation(annotation: Image.Image, path: Path) -> np.ndarray:
    # Palette PNGs are rejected: their indices may not be class values, and guessing would corrupt labels silently.
    if annotation.mode != "L":
        raise DatasetError(f"annotation {path} must be a single-channel 8-bit PNG (mode L), got mode "
                           f"{annotation.mode} with {len(annotation.getbands())} channel(s)")
    labels = np.asarray(annotation, dtype=np.uint8)
    if labels.size and (top := int(labels.max())) > N_CLASSES:
        raise DatasetError(f"annotation {path} holds value {top}; ADE20K labels are 0..{N_CLASSES}")
    return labels


def _check_sizes(sample: Sample, image: Image.Image, annotation: Image.Image) -> None:
    if image.size != annotation.size:
        raise DatasetError(f"image {sample.image_path} is {image.size[0]}x{image.size[1]} but its annotation "
                           f"{sample.annotation_path} is {annotation.size[0]}x{annotation.size[1]}")


def _short_side_size(width: int, height: int, crop_size: int) -> tuple[int, int]:
    scale = crop_size / min(width, height)
    return max(crop_size, round(width * scale)), max(crop_size, round(height * scale))


def load_sample(sample: Sample, crop_size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """(image_HW3 uint8 RGB, labels_HW uint8), both crop_size x crop_size, cut with the same geometry."""
    image = _open_image(sample.image_path, "image")
    annotation = _open_image(sample.annotation_path, "annotation")
    labels = _check_annotation(annotation, sample.annotation_path)
    _check_sizes(sample, image, annotation)
    size = _short_side_size(*image.size, crop_size)
    left, top = (size[0] - crop_size) // 2, (size[1] - crop_size) // 2
    box = (left, top, left + crop_size, top + crop_size)
    image_HW3 = np.asarray(_to_rgb(image).resize(size, Image.Resampling.BICUBIC).crop(box), dtype=np.uint8)
    mask = Image.fromarray(labels).resize(size, Image.Resampling.NEAREST).crop(box)
    return image_HW3, np.asarray(mask, dtype=np.uint8)


def check_split(samples: Sequence[Sample]) -> None:
    """The cheap pass before any recording: each annotation decoded (mode L, labels 0..150), each image's header
    read (readable, same size as its annotation). A truncated image is found only when it is decoded to record it."""
    def check(sample: Sample) -> None:
        annotation = _open_image(sample.annotation_path, "annotation")
        _check_annotation(annotation, sample.annotation_path)
        with _open_image(sample.image_path, "image", decode=False) as image:
            _check_sizes(sample, image, annotation)

    _each(check, samples)


# ---------------------------------------------------------------------------------------------------------------
# Patch labels


def patch_labels(labels_HW: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Majority label of each patch (0 counts; ties go to the smallest label) and the share of pixels carrying it.

    Accepts [H, W] or a batch [B, H, W]; H and W must be multiples of patch_size. Returns uint8 labels and
    float32 purity of shape [h, w] (or [B, h, w]).
    """
    labels = np.asarray(labels_HW)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be [H, W] or [B, H, W], got shape {labels.shape}")
    batch = labels if labels.ndim == 3 else labels[None]
    n, height, width = batch.shape
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(f"label map {height}x{width} does not split into {patch_size}x{patch_size} patches")
    h, w, area = height // patch_size, width // patch_size, patch_size * patch_size
    pixels = batch.reshape(n, h, patch_size, w, patch_size).transpose(0, 1, 3, 2, 4).reshape(-1, area)
    # Sorted, each label is one run; the first position where a run reaches the longest length belongs to the
    # smallest of the tied labels, which is what argmax returns.
    ordered = np.sort(pixels, axis=1)
    position = np.arange(area, dtype=np.int32)
    starts = np.ones(ordered.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run_start = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    run_length = position - run_start + 1
    best = np.argmax(run_length, axis=1)
    rows = np.arange(len(ordered))
    majority = ordered[rows, best].astype(np.uint8).reshape(n, h, w)
    purity = (run_length[rows, best] / area).astype(np.float32).reshape(n, h, w)
    return (majority, purity) if labels.ndim == 3 else (majority[0], purity[0])
