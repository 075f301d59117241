"""Checkpoint files: atomic writes of safetensors + JSON pairs, and safe reading of the reference `.pt` format.

Nothing is ever loaded with unrestricted pickle.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .artifacts import write_atomic


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or of the wrong shape; the message names the file."""


def save_tensors(folder: Path, stem: str, tensors: dict[str, torch.Tensor], meta: dict) -> tuple[Path, Path]:
    """Writes `<stem>.safetensors` and `<stem>.json` atomically (JSON last: its presence marks a complete pair)."""
    return _write_pair(folder, stem, lambda tmp: save_file({k: v.detach().cpu().contiguous()
                                                            for k, v in tensors.items()}, str(tmp)), meta)


SAFETENSORS_DTYPES = {torch.int64: "I64", torch.int32: "I32", torch.float32: "F32", torch.uint8: "U8"}


def stream_tensors(folder: Path, stem: str, layout: dict[str, tuple[torch.dtype, list[int]]], write_data,
                   meta: dict) -> tuple[Path, Path]:
    """`save_tensors` for tensors too large to hold: `layout` gives each tensor's dtype and shape, in the order
    `write_data(file, offsets)` writes their bytes after the header (offsets: each tensor's first byte in the file,
    for writers that fill several tensors at once)."""
    header, offset = {}, 0
    for name, (dtype, shape) in layout.items():
        end = offset + torch.empty(0, dtype=dtype).element_size() * math.prod(shape)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    start = 8 + len(text)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            write_data(out, {name: start + h["data_offsets"][0] for name, h in header.items()})
            out.flush()
            os.fsync(out.fileno())

    return _write_pair(folder, stem, write, meta)


def _write_pair(folder: Path, stem: str, write_weights, meta: dict) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    weights, config = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    tmp = folder / f".{stem}.{os.getpid()}.safetensors.tmp"
    write_weights(tmp)
    os.replace(tmp, weights)
    write_atomic(config, json.dumps(meta, indent=2, sort_keys=True).encode())
    return weights, config


def load_tensors(folder_or_file: Path, stem: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads a pair written by `save_tensors`; accepts the folder or either file of the pair."""
    p = Path(folder_or_file)
    folder = p if p.is_dir() else p.parent
    weights, config = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    for f in (weights, config):
        if not f.exists():
            raise CheckpointError(f"{f}: missing (a checkpoint is the pair {stem}.safetensors + {stem}.json)")
    try:
        meta = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config}: unreadable {stem} checkpoint JSON: {exc}") from exc
    return read_safetensors(weights), meta


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt file is an error that names it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
        tensors = {}
        for name in names:
            # Each tensor on a mapping of its own (its pages read from the file when used): a tensor moved elsewhere
            # (the study's shared memory) releases its pages. With one mapping per file, every page read stayed
            # resident until the file's last tensor went: at ADE20K's shape, 0.7 GB more at the study's peak.
            with safe_open(str(path), framework="pt") as f:
                tensors[name] = f.get_tensor(name)
        return tensors
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc


def read_reference_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Reads the original experiment's format: one JSON line (config), then a torch-saved state dict. Returns (config,
    state dict); the config is the header's `cfg` where newer files wrap it ({"schema": ..., "cfg": {...}})."""
    header, state = read_header_and_state(path)
    config = header.get("cfg", header) if isinstance(header.get("cfg"), dict) else header
    return config, state


def read_header_and_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON header line and the torch-saved state dict after it, as they are.

    The state dict is loaded with torch's weights-only unpickler, which refuses anything but tensors and plain
    containers, so a crafted file cannot run code.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header_line = f.readline()
            payload = f.read()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(header_line)
    except ValueError as exc:  # not JSON, or not text at all (a bare torch file has no header line)
        raise CheckpointError(f"{path}: the first line is not a JSON header ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the JSON header is not an object")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused: the payload holds more than tensors (weights-only load: {exc})") from exc
    except Exception as exc:  # torch raises several kinds for corrupt data
        raise CheckpointError(f"{path}: not a torch-saved state dict after the header ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: the payload is not a state dict of tensors")
    return header, state
