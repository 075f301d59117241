"""Finding the SAE or probe checkpoint to import (configured path, else the drop folder) and telling, by content hash
over two observations, when a new one is complete: the logic behind the checkpoint sensors, without Dagster.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

KINDS = ("sae", "probe")
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint on disk: `source` is what the importer reads (a folder of our pair, or a reference `.pt` file),
    `files` what makes up its content; `complete` is false while a file of our pair is still missing."""

    source: Path
    files: tuple[Path, ...]
    complete: bool


@dataclass(frozen=True)
class Seen:
    """One observation of a complete checkpoint: its content hash and total size."""

    sha256: str
    size: int
    source: str


def drop_folder(data_dir: Path, kind: str) -> Path:
    """`<data_dir>/checkpoints/<kind>/`: a checkpoint placed here is imported instead of training one."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
    return Path(data_dir) / "checkpoints" / kind


def find_checkpoint(kind: str, data_dir: Path, configured: str = "") -> Checkpoint | None:
    """The checkpoint to import for `kind`: the configured path if set (whether or not it exists yet), else the drop
    folder's `<kind>.safetensors` + `<kind>.json` pair, else its `<kind>.pt`; None when there is nothing to import."""
    if configured:
        return _at(Path(configured).expanduser(), kind)
    folder = drop_folder(data_dir, kind)
    pair = (folder / f"{kind}.safetensors", folder / f"{kind}.json")
    # Either half of the pair claims the folder, so an unfinished copy gives a clear error instead of training.
    if any(f.exists() for f in pair):
        return Checkpoint(folder, pair, all(f.exists() for f in pair))
    reference = folder / f"{kind}.pt"
    return Checkpoint(reference, (reference,), True) if reference.is_file() else None


def _at(path: Path, kind: str) -> Checkpoint:
    """The same reading of a path as the importers: a folder or either file of our pair, else a reference file."""
    if path.is_dir() or path.suffix in (".safetensors", ".json"):
        folder = path if path.is_dir() else path.parent
        pair = (folder / f"{kind}.safetensors", folder / f"{kind}.json")
        return Checkpoint(folder, pair, all(f.exists() for f in pair))
    return Checkpoint(path, (path,), path.is_file())


def content_sha256(files: tuple[Path, ...]) -> tuple[str, int]:
    """sha256 over the files' names, lengths and bytes (never their times), and their total size."""
    digest, total = hashlib.sha256(), 0
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
                total += len(block)
    return digest.hexdigest(), total


def observe(kind: str, data_dir: Path, configured: str = "") -> Seen | None:
    """The complete checkpoint for `kind` now, or None (nothing there, half a pair, or a file vanishing mid-read)."""
    checkpoint = find_checkpoint(kind, data_dir, configured)
    if checkpoint is None or not checkpoint.complete:
        return None
    try:
        sha256, size = content_sha256(checkpoint.files)
    except OSError:  # replaced or removed between listing and reading: look again next time
        return None
    return Seen(sha256, size, str(checkpoint.source))


@dataclass(frozen=True)
class WatchState:
    """What a sensor remembers between ticks: the hash it last accepted and a candidate seen once."""

    accepted: str | None = None
    pending: Seen | None = None

    def to_json(self) -> str:
        pending = self.pending.__dict__ if self.pending else None
        return json.dumps({"accepted": self.accepted, "pending": pending}, sort_keys=True)

    @classmethod
    def from_json(cls, cursor: str | None) -> WatchState:
        if not cursor:
            return cls()
        data = json.loads(cursor)
        return cls(data.get("accepted"), Seen(**data["pending"]) if data.get("pending") else None)


def step(state: WatchState, seen: Seen | None) -> tuple[WatchState, str | None]:
    """Advances the watch by one observation; returns the new state and the hash to import, if one is accepted.

    A hash is accepted when the same content (hash and size) is seen on two consecutive observations, so a file
    still being copied, which changes between looks, never triggers. Content already accepted triggers nothing.
    """
    if seen is None or seen.sha256 == state.accepted:
        return WatchState(state.accepted, None), None
    pending = state.pending
    if pending is not None and (pending.sha256, pending.size) == (seen.sha256, seen.size):
        return WatchState(seen.sha256, None), seen.sha256
    return WatchState(state.accepted, seen), None
