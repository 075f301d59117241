"""The example images of a class's suppression report: the validation images with the most class pixels, their ground
truth and the probe's pixel predictions before and after suppression, kept as `examples.npz` for the pictures."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..report.results import Measured
from .logit_shift import LogitShift
from .model import SuppressionModel

FORMAT_VERSION = 1  # of examples.npz
EXAMPLES_FILE = "examples.npz"


def example_images(model: SuppressionModel, class_index: int, n: int = 3) -> list[int]:
    """The validation images with the most class-c pixels (ties: lower index), those with none left out."""
    counts = model.pixels_BC[:, class_index]
    order = torch.argsort(-counts, stable=True)[:n]
    return [int(i) for i in order if counts[i] > 0]


def example_predictions(model: SuppressionModel, shift: LogitShift, images: list[int], crop: int) -> torch.Tensor:
    """Pixel predictions [n, crop, crop] of a few images after a shift, through metrics.pixel_predictions."""
    from ..probe.metrics import grid_logits, pixel_predictions

    P = model.grid * model.grid
    tokens = (torch.cat([torch.arange(i * P, (i + 1) * P) for i in images]) if images
              else torch.zeros(0, dtype=torch.long))
    logits_TC = model.codes.logits_NC[tokens] + shift.dense(tokens)
    return pixel_predictions(grid_logits(logits_TC.reshape(len(images), P, -1), model.grid), crop)


def class_examples(model: SuppressionModel, class_index: int, settings: dict[str, Measured], image_ids: list[str],
                   crop: int, load_rgb=None, n: int = 3) -> dict[str, np.ndarray]:
    """The arrays of examples.npz: `image_ids` [n] and `rgb` [n, crop, crop, 3] uint8 (zeros where `load_rgb(image
    id)` gives None: `has_rgb`), `ground_truth` and `baseline` [n, crop, crop] uint8 (ADE mask values), and per entry
    of `settings` ("configured", "tuned") the prediction after that suppression."""
    images = example_images(model, class_index, n)
    arrays = {"class_index": np.asarray(class_index), "image_ids": np.asarray([image_ids[i] for i in images]),
              "ground_truth": model.pixel_labels_BHW[images].numpy().astype(np.uint8),
              "baseline": model.codes.pixel_pred_BHW[images].numpy().astype(np.uint8)}
    for name, measured in settings.items():
        shift = model.effect(measured.latents).shift(measured.setting.scale, measured.setting.mode, images)
        arrays[name] = example_predictions(model, shift, images, crop).numpy().astype(np.uint8)
    rgb = [load_rgb(image_ids[i]) if load_rgb else None for i in images]
    arrays["has_rgb"] = np.asarray([image is not None for image in rgb])
    arrays["rgb"] = np.stack([np.zeros((crop, crop, 3), np.uint8) if image is None else np.asarray(image, np.uint8)
                              for image in rgb]) if images else np.zeros((0, crop, crop, 3), np.uint8)
    return arrays


def validation_crops(dataset_root: str, crop: int,
                     log: Callable[[str], None] = logging.getLogger(__name__).warning):
    """`load(image id)` -> the RGB crop of a validation image as recorded, or None where the dataset cannot be read,
    saying which image and why through `log` (a picture is a view: a moved dataset leaves its panels blank rather
    than failing the report)."""
    from ..data.ade20k import DatasetError, list_split, load_sample

    samples: dict | None = None

    def load(image_id: str):
        nonlocal samples
        try:
            if samples is None:
                samples = {s.image_id: s for s in list_split(dataset_root, "validation")}
            return load_sample(samples[image_id], crop)[0]
        except KeyError:
            log(f"validation image {image_id} is not in the dataset at {dataset_root!r}: its example is left blank")
        except (DatasetError, OSError) as exc:
            log(f"validation image {image_id} of {dataset_root!r} cannot be read ({exc}): its example is left blank")
        samples = samples or {}
        return None

    return load


def save_examples(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Writes examples.npz atomically."""
    import io

    from ..store.artifacts import write_atomic

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path = Path(folder) / EXAMPLES_FILE
    write_atomic(path, buffer.getvalue())
    return path


def load_examples(folder: Path) -> dict[str, np.ndarray]:
    """The arrays of a report's examples.npz (no pickled objects are read)."""
    with np.load(Path(folder) / EXAMPLES_FILE, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
