"""The example images of a class's suppression report: the validation images with the most class pixels, their ground
truth and the probe's pixel predictions before and after suppression, kept as `examples.npz` for the pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .suppression import (
    SuppressionModel,
    edit_shift,
    example_images,
    example_predictions,
    latent_edit,
)

EXAMPLES_FILE = "examples.npz"
# Label maps [n, crop, crop] uint8 (ADE mask values); `tuned` only where the class has a tuned setting.
LABEL_PANELS = ("ground_truth", "baseline", "configured", "tuned")


def class_examples(model: SuppressionModel, class_index: int, settings: dict[str, dict], image_ids: list[str],
                   crop: int, load_rgb=None, n: int = 3) -> dict[str, np.ndarray]:
    """The arrays of examples.npz: `image_ids` [n] and `rgb` [n, crop, crop, 3] uint8 (zeros where `load_rgb(image
    id)` gives None: `has_rgb`), `ground_truth` and `baseline`, and per entry of `settings` ("configured",
    "tuned": {"latents", "scale", "mode"}) the prediction after that suppression."""
    images = example_images(model, class_index, n)
    arrays = {"class_index": np.asarray(class_index), "image_ids": np.asarray([image_ids[i] for i in images]),
              "ground_truth": model.pixel_labels_BHW[images].numpy().astype(np.uint8),
              "baseline": model.codes.pixel_pred_BHW[images].numpy().astype(np.uint8)}
    for name, setting in settings.items():
        edit = latent_edit(model, tuple(setting["latents"]), float(setting["scale"]), setting["mode"])
        arrays[name] = example_predictions(model, edit_shift(model, edit), images, crop)[1].numpy().astype(np.uint8)
    rgb = [load_rgb(image_ids[i]) if load_rgb else None for i in images]
    arrays["has_rgb"] = np.asarray([image is not None for image in rgb])
    arrays["rgb"] = np.stack([np.zeros((crop, crop, 3), np.uint8) if image is None else np.asarray(image, np.uint8)
                              for image in rgb]) if images else np.zeros((0, crop, crop, 3), np.uint8)
    return arrays


def validation_crops(dataset_root: str, crop: int):
    """`load(image id)` -> the RGB crop of a validation image as recorded, or None where the dataset cannot be read
    (a picture is a view: a moved dataset leaves its panels blank rather than failing the report)."""
    from ..data.ade20k import DatasetError, list_split, load_sample

    samples: dict | None = None

    def load(image_id: str):
        nonlocal samples
        try:
            if samples is None:
                samples = {s.image_id: s for s in list_split(dataset_root, "validation")}
            return load_sample(samples[image_id], crop)[0]
        except (DatasetError, KeyError, OSError):
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
