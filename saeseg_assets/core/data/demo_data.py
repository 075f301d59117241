"""The embedded default dataset: collages of real package photos written in the ADEChallengeData2016 layout.
Each region is cut from a hand-checked box that shows one ADE20K class; train and validation use disjoint parts."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from PIL import Image

from .ade20k import CLASSES, DATASET_FOLDER, DatasetError, class_by_index, class_by_key

GENERATOR_VERSION = 1  # bump whenever the output bytes change, so old demo sets are rebuilt
MANIFEST = "demo_manifest.json"
TRAIN_FRACTION = 0.75  # of each source box, along its longer side; validation gets the rest
SIDE_RANGE = (256, 448)  # image width and height, inclusive
REGIONS_RANGE = (2, 5)  # labelled regions per image, inclusive
OTHER_PROBABILITY = 0.25  # chance that an image also holds a region labelled 0 ("other")
GREY_PROBABILITY = 0.08  # chance that an image is written as a single-channel JPEG
_SPLIT_PREFIX = {"training": "train", "validation": "val"}


@dataclass(frozen=True)
class SourceBox:
    """A box of a photo that shows only one class. Coordinates are (left, top, right, bottom) in source pixels."""

    package: str  # the installed distribution that ships the photo
    file: str  # the photo's path inside that package
    box: tuple[int, int, int, int]
    class_key: str | None  # None: label 0, a mixed area no ADE class describes
    shows: str

    @property
    def class_index(self) -> int:
        return 0 if self.class_key is None else class_by_key(self.class_key).index

    def part(self, split: str) -> tuple[int, int, int, int]:
        """The training part is the first TRAIN_FRACTION of the box along its longer side, validation the rest."""
        left, top, right, bottom = self.box
        if right - left >= bottom - top:
            cut = left + round((right - left) * TRAIN_FRACTION)
            return (left, top, cut, bottom) if split == "training" else (cut, top, right, bottom)
        cut = top + round((bottom - top) * TRAIN_FRACTION)
        return (left, top, right, cut) if split == "training" else (left, cut, right, bottom)


_SK, _SKL = "skimage", "sklearn"
SOURCES: tuple[SourceBox, ...] = (
    SourceBox(_SK, "data/brick.png", (0, 0, 512, 512), "001_wall", "brick wall texture (grey)"),
    SourceBox(_SKL, "datasets/images/china.jpg", (130, 105, 285, 335), "002_building", "the temple's storeys"),
    SourceBox(_SK, "data/rocket.jpg", (100, 0, 168, 320), "003_sky", "evening sky left of the second tower"),
    SourceBox(_SK, "data/rocket.jpg", (212, 0, 300, 320), "003_sky", "evening sky left of the rocket"),
    SourceBox(_SK, "data/rocket.jpg", (345, 0, 432, 300), "003_sky", "evening sky right of the rocket"),
    SourceBox(_SK, "data/rocket.jpg", (458, 0, 550, 320), "003_sky", "evening sky left of the right tower"),
    SourceBox(_SKL, "datasets/images/china.jpg", (330, 0, 630, 128), "003_sky", "hazy sky right of the temple"),
    SourceBox(_SKL, "datasets/images/china.jpg", (0, 0, 90, 140), "003_sky", "hazy sky left of the temple"),
    SourceBox(_SK, "data/camera.png", (0, 0, 95, 160), "003_sky", "sky behind the cameraman's back (grey)"),
    SourceBox(_SK, "data/camera.png", (280, 0, 400, 120), "003_sky", "sky above the camera (grey)"),
    SourceBox(_SK, "data/camera.png", (445, 0, 512, 150), "003_sky", "sky right of the tower (grey)"),
    SourceBox(_SK, "data/motorcycle_left.png", (0, 320, 115, 500), "004_floor", "garage concrete floor, left"),
    SourceBox(_SK, "data/motorcycle_left.png", (360, 390, 500, 500), "004_floor", "garage floor under the engine"),
    SourceBox(_SKL, "datasets/images/china.jpg", (410, 325, 640, 427), "005_tree", "tree crowns, bottom right"),
    SourceBox(_SKL, "datasets/images/china.jpg", (0, 372, 190, 427), "005_tree", "tree crowns, bottom left"),
    SourceBox(_SK, "data/grass.png", (0, 0, 512, 512), "010_grass", "grass close-up (grey)"),
    SourceBox(_SK, "data/camera.png", (420, 260, 512, 512), "010_grass", "lawn right of the tripod (grey)"),
    SourceBox(_SK, "data/astronaut.png", (70, 290, 270, 512), "013_person", "the astronaut's suit and badge"),
    SourceBox(_SK, "data/camera.png", (20, 280, 140, 500), "013_person", "the cameraman's coat (grey)"),
    SourceBox(_SK, "data/gravel.png", (0, 0, 512, 512), "014_earth", "gravel ground (grey)"),
    SourceBox(_SK, "data/coffee.png", (440, 0, 600, 65), "016_table", "wooden table top, top right"),
    SourceBox(_SK, "data/coffee.png", (480, 290, 600, 400), "016_table", "wooden table top, bottom right"),
    SourceBox(_SK, "data/coffee.png", (0, 110, 65, 330), "016_table", "wooden table top, left"),
    SourceBox(_SKL, "datasets/images/china.jpg", (355, 248, 540, 295), "022_water", "the lake below the island"),
    SourceBox(_SKL, "datasets/images/flower.jpg", (215, 130, 400, 315), "067_flower", "the dahlia's petals"),
    SourceBox(_SK, "data/motorcycle_left.png", (305, 185, 468, 335), "117_minibike", "tank, engine and seat"),
    SourceBox(_SK, "data/chelsea.png", (55, 0, 325, 265), "127_animal", "the cat's face and fur"),
    SourceBox(_SK, "data/astronaut.png", (0, 0, 60, 240), "150_flag", "the US flag behind the astronaut"),
    SourceBox(_SK, "data/coffee.png", (180, 20, 400, 300), None, "cup, coffee, saucer and spoon"),
    SourceBox(_SK, "data/motorcycle_left.png", (560, 0, 720, 100), None, "shelf with cardboard boxes"),
    SourceBox(_SK, "data/motorcycle_left.png", (340, 0, 480, 90), None, "shelf with tins and tools"),
)
DEMO_CLASSES: tuple[int, ...] = tuple(sorted({s.class_index for s in SOURCES} - {0}))


# ---------------------------------------------------------------------------------------------------------------
# Composing one image


@dataclass(frozen=True)
class Crop:
    source: SourceBox
    box: tuple[int, int, int, int]  # the source pixels used, (left, top, right, bottom), inside source.part(split)


@dataclass(frozen=True)
class DemoImage:
    split: str
    image_id: str
    image: Image.Image  # RGB, or L for the few greyscale images
    labels_HW: np.ndarray  # uint8
    crops: tuple[Crop, ...]


def source_path(source: SourceBox) -> Path:
    # find_spec locates the installed package without importing it (importing scikit-learn takes seconds).
    spec = find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"package {source.package} is not installed; the demo dataset needs its photo {source.file}")
    return Path(next(iter(spec.submodule_search_locations))) / source.file


@cache
def _photo(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _layout(rng: np.random.Generator, width: int, height: int, n_regions: int) -> np.ndarray:
    """Region ids 0..n_regions-1 per pixel: a weighted Voronoi diagram on wavy coordinates, so borders curve."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    amplitude, period, phase = rng.uniform(4, 18), rng.uniform(60, 160), rng.uniform(0, 2 * np.pi, size=2)
    xs = xs + amplitude * np.sin(2 * np.pi * ys / period + phase[0])
    ys = ys + amplitude * np.sin(2 * np.pi * xs / period + phase[1])
    seeds = rng.uniform(0, 1, size=(n_regions, 2)) * [width, height]
    weights = rng.uniform(0.7, 1.4, size=n_regions)
    distance = ((xs[None] - seeds[:, 0, None, None]) ** 2 + (ys[None] - seeds[:, 1, None, None]) ** 2)
    return np.argmin(distance / weights[:, None, None] ** 2, axis=0)


def _cut(rng: np.random.Generator, source: SourceBox, split: str, width: int, height: int) -> Crop:
    """A random piece of the source's split part with the aspect of a width x height region, at a jittered scale."""
    left, top, right, bottom = source.part(split)
    part_w, part_h = right - left, bottom - top
    scale = min(rng.uniform(0.8, 1.25), part_w / width, part_h / height)  # small parts get upsampled
    crop_w = min(part_w, max(1, round(width * scale)))
    crop_h = min(part_h, max(1, round(height * scale)))
    x = left + int(rng.integers(0, part_w - crop_w + 1))
    y = top + int(rng.integers(0, part_h - crop_h + 1))
    return Crop(source, (x, y, x + crop_w, y + crop_h))


def _choose_sources(rng: np.random.Generator) -> list[SourceBox]:
    n_regions = int(rng.integers(REGIONS_RANGE[0], REGIONS_RANGE[1] + 1))
    classes = [int(c) for c in rng.choice(DEMO_CLASSES, size=n_regions, replace=False)]
    if rng.random() < OTHER_PROBABILITY:
        classes.append(0)
    chosen = []
    for index in classes:
        candidates = [s for s in SOURCES if s.class_index == index]
        chosen.append(candidates[int(rng.integers(len(candidates)))])
    return chosen


def compose_image(split: str, number: int, seed: int) -> DemoImage:
    """Image `number` (1-based) of a split; every random choice comes from (seed, split, number)."""
    rng = np.random.default_rng([seed, list(_SPLIT_PREFIX).index(split), number])
    width, height = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=2))
    sources = _choose_sources(rng)
    regions_HW = _layout(rng, width, height, len(sources))
    canvas_HW3 = np.zeros((height, width, 3), dtype=np.uint8)
    labels_HW = np.zeros((height, width), dtype=np.uint8)
    crops = []
    for region, source in enumerate(sources):
        mask_HW = regions_HW == region
        if not mask_HW.any():
            continue
        rows, cols = np.nonzero(mask_HW)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        crop = _cut(rng, source, split, right - left, bottom - top)
        # Crop before resizing: resizing with a box would let the filter read pixels outside the split's part.
        piece = _photo(source_path(source)).crop(crop.box).resize((right - left, bottom - top),
                                                                   Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            piece = piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        inside = mask_HW[top:bottom, left:right]
        canvas_HW3[top:bottom, left:right][inside] = np.asarray(piece)[inside]
        labels_HW[mask_HW] = source.class_index
        crops.append(crop)
    image = Image.fromarray(canvas_HW3)
    if rng.random() < GREY_PROBABILITY:
        image = image.convert("L")
    image_id = f"ADE_{_SPLIT_PREFIX[split]}_{number:08d}"
    return DemoImage(split, image_id, image, labels_HW, tuple(crops))


def iter_demo_images(n_train: int, n_val: int, seed: int) -> Iterator[DemoImage]:
    for split, count in (("training", n_train), ("validation", n_val)):
        for number in range(1, count + 1):
            yield compose_image(split, number, seed)


# ---------------------------------------------------------------------------------------------------------------
# Writing the set


def _object_info(pixels: dict[int, int], images: dict[str, dict[int, int]]) -> str:
    """objectInfo150.txt with the real file's columns; Ratio is the class's share of all demo pixels."""
    total = sum(pixels.values()) or 1
    lines = ["Idx\tRatio\tTrain\tVal\tName"]
    for c in CLASSES:
        lines.append(f"{c.index}\t{pixels.get(c.index, 0) / total:.4f}\t{images['training'].get(c.index, 0)}\t"
                     f"{images['validation'].get(c.index, 0)}\t{', '.join(c.names)}")
    return "\n".join(lines) + "\n"


def _readme(params: dict[str, int], shares: dict[str, dict[int, float]]) -> str:
    lines = [
        "saeseg demo dataset: real-photo collages in the ADE20K SceneParsing layout. This is NOT ADE20K.",
        "",
        f"Made by saeseg_assets.core.data.demo_data (generator version {GENERATOR_VERSION}) with {params}.",
        "Each image is 2-5 curved regions; each region is filled with a piece of a real photo that ships inside a",
        "Python package (scikit-image's skimage/data, scikit-learn's datasets/images), cut from a box that shows",
        "only the region's class, and labelled with that class's ADE20K mask value (0 = other: a mixed area).",
        f"Training uses the first {TRAIN_FRACTION:.0%} of each box along its longer side, validation the rest,",
        "so no source pixel appears in both splits. Pieces are rescaled and sometimes mirrored; a few images",
        "are written greyscale. Masks: 8-bit single-channel PNG, same size as the image.",
        "",
        "Sources (package, file, box left,top,right,bottom -> class):",
    ]
    for s in SOURCES:
        label = "0 other" if s.class_key is None else s.class_key
        lines.append(f"  {s.package:8s} {s.file:28s} {s.box!s:22s} -> {label:14s} {s.shows}")
    lines += ["", "Pixel share per class (training / validation):"]
    for index in (0, *DEMO_CLASSES):
        name = "other" if index == 0 else class_by_index(index).key
        train, val = shares["training"].get(index, 0), shares["validation"].get(index, 0)
        lines.append(f"  {name:14s} {train:6.1%} / {val:6.1%}")
    return "\n".join(lines) + "\n"


def _write_all(root: Path, params: dict[str, int]) -> None:
    pixels: dict[int, int] = {}
    images: dict[str, dict[int, int]] = {"training": {}, "validation": {}}
    split_pixels: dict[str, dict[int, int]] = {"training": {}, "validation": {}}
    for split in _SPLIT_PREFIX:
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    for demo in iter_demo_images(params["n_train"], params["n_val"], params["seed"]):
        demo.image.save(root / "images" / demo.split / f"{demo.image_id}.jpg", quality=90)
        Image.fromarray(demo.labels_HW).save(root / "annotations" / demo.split / f"{demo.image_id}.png")
        values, counts = np.unique(demo.labels_HW, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            pixels[value] = pixels.get(value, 0) + count
            split_pixels[demo.split][value] = split_pixels[demo.split].get(value, 0) + count
            images[demo.split][value] = images[demo.split].get(value, 0) + 1
    shares = {split: {k: v / max(1, sum(counts.values())) for k, v in counts.items()}
              for split, counts in split_pixels.items()}
    (root / "objectInfo150.txt").write_text(_object_info(pixels, images), encoding="utf-8")
    (root / "README.txt").write_text(_readme(params, shares), encoding="utf-8")
    # The manifest goes last: its presence is what marks a set as complete.
    manifest = {"generator": "saeseg demo collages", "version": GENERATOR_VERSION, **params, "pixel_shares": shares}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")


def _manifest_matches(folder: Path, params: dict[str, int]) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("version") == GENERATOR_VERSION and all(manifest.get(k) == v for k, v in params.items())


def write_demo_dataset(dest: Path | str, n_train: int = 240, n_val: int = 60, seed: int = 0) -> Path:
    """Writes (or finds) dest/ADEChallengeData2016 and returns its path. Same arguments, same bytes.

    The set is built in a hidden folder inside dest and renamed into place, so a reader never sees half a set.
    A demo set made with other arguments is replaced; a folder that is not a demo set is never touched.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError(f"the demo set needs at least one image per split, got n_train={n_train}, n_val={n_val}")
    dest = Path(dest)
    final = dest / DATASET_FOLDER
    params = {"n_train": int(n_train), "n_val": int(n_val), "seed": int(seed)}
    if _manifest_matches(final, params):
        return final
    if final.exists() and not (final / MANIFEST).exists():
        raise DatasetError(f"{final} exists and is not a saeseg demo set; it will not be overwritten")
    dest.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".demo-building-", dir=dest))
    try:
        _write_all(building, params)
        _move_into_place(building, final, params)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final


def _move_into_place(building: Path, final: Path, params: dict[str, int]) -> None:
    stale = None
    if final.exists():  # a demo set made with other arguments
        stale = final.with_name(f".demo-stale-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(final, stale)
    try:
        os.replace(building, final)
    except OSError:
        # Another process finished the same set first: theirs is as good as ours.
        if not _manifest_matches(final, params):
            raise
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
