"""Finding the SAE or probe checkpoint to import (configured path, else the drop folder), telling when a new one has
settled (same content and times on two looks, quiet for QUIET_PERIOD_S), and copying what is imported: the logic
behind the checkpoint sensors and the import assets, without Dagster.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("sae", "probe")
# The pairs a folder may hold, in order of precedence: ours, then (SAE only) SAELens's.
PAIRS = {"sae": (("sae.safetensors", "sae.json"), ("sae_weights.safetensors", "cfg.json")),
         "probe": (("probe.safetensors", "probe.json"),)}
# A checkpoint counts as settled only when its newest file was last modified at least this long ago (and hash, size
# and times were the same on two consecutive looks): a copy that pauses for less never triggers an import. A longer
# pause can still trigger one, which then fails rather than import other bytes (docs/automation.md).
QUIET_PERIOD_S = 60
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint on disk: `source` is what the importer reads (a folder of a pair, or a single `.pt` file), `files`
    what makes up its content; `complete` is false while a file of a pair is still missing. `origin`: for a copy
    (`snapshot`), the source it was copied from."""

    source: Path
    files: tuple[Path, ...]
    complete: bool
    origin: Path | None = None


@dataclass(frozen=True)
class Seen:
    """One observation of a complete checkpoint: its content hash, total size and newest modification time."""

    sha256: str
    size: int
    source: str
    mtime: float = 0.0


def drop_folder(data_dir: Path, kind: str) -> Path:
    """`<data_dir>/checkpoints/<kind>/`: a checkpoint placed here is imported instead of training one."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
    return Path(data_dir) / "checkpoints" / kind


def find_checkpoint(kind: str, data_dir: Path, configured: str = "") -> Checkpoint | None:
    """The checkpoint to import for `kind`: the configured path if set (whether or not it exists yet), else the drop
    folder's pair (`<kind>.safetensors` + `<kind>.json`, or for an SAE SAELens's `sae_weights.safetensors` +
    `cfg.json`), else its `<kind>.pt`; None when there is nothing to import."""
    if configured:
        return _at(Path(configured).expanduser(), kind)
    folder = drop_folder(data_dir, kind)
    # Either half of a pair claims the folder, so an unfinished copy gives a clear error instead of training.
    if (pair := _pair_in(folder, kind)) is not None:
        return Checkpoint(folder, pair, all(f.exists() for f in pair))
    reference = folder / f"{kind}.pt"
    return Checkpoint(reference, (reference,), True) if reference.is_file() else None


def _pair_in(folder: Path, kind: str) -> tuple[Path, ...] | None:
    """The first pair of `kind` of which a file exists in `folder`."""
    for names in PAIRS[kind]:
        if any((folder / name).exists() for name in names):
            return tuple(folder / name for name in names)
    return None


def _at(path: Path, kind: str) -> Checkpoint:
    """The same reading of a path as the importers: a folder or either file of a pair, else a single (`.pt`) file."""
    if path.is_dir() or path.suffix in (".safetensors", ".json"):
        folder = path if path.is_dir() else path.parent
        named = [names for names in PAIRS[kind] if path.name in names]
        pair = tuple(folder / n for n in named[0]) if named else _pair_in(folder, kind) or tuple(
            folder / n for n in PAIRS[kind][0])
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


def snapshot(checkpoint: Checkpoint, into: Path) -> tuple[Checkpoint, str]:
    """Copies a complete checkpoint's files into the folder `into` (same names) and hashes the copies: what is then
    imported from the returned copy is exactly what was hashed, whatever happens to the originals meanwhile."""
    copies = []
    for path in checkpoint.files:
        try:
            shutil.copyfile(path, into / path.name)
        except OSError as exc:
            raise FileNotFoundError(f"{path}: could not be copied for import ({exc})") from exc
        copies.append(into / path.name)
    source = into / checkpoint.source.name if checkpoint.source in checkpoint.files else into
    return Checkpoint(source, tuple(copies), True, checkpoint.source), content_sha256(tuple(copies))[0]


def observe(kind: str, data_dir: Path, configured: str = "") -> Seen | None:
    """The complete checkpoint for `kind` now, or None (nothing there, half a pair, or a file vanishing mid-read)."""
    checkpoint = find_checkpoint(kind, data_dir, configured)
    if checkpoint is None or not checkpoint.complete:
        return None
    try:
        before = max(f.stat().st_mtime for f in checkpoint.files)
        sha256, size = content_sha256(checkpoint.files)
        mtime = max(f.stat().st_mtime for f in checkpoint.files)
    except OSError:  # replaced or removed between listing and reading: look again next time
        return None
    # Written to while being read: a time that changed between the two stats never matches the next look's.
    return Seen(sha256, size, str(checkpoint.source), mtime if mtime == before else -1.0)


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


def step(state: WatchState, seen: Seen | None, now: float | None = None,
         quiet_s: float = QUIET_PERIOD_S) -> tuple[WatchState, str | None]:
    """Advances the watch by one observation at time `now`; returns the new state and the hash to import, if one is
    accepted.

    A hash is accepted when the same content (hash, size and newest modification time) is seen on two consecutive
    observations and that time lies at least `quiet_s` before `now`: a file still being copied, which changes between
    looks or was touched a moment ago, never triggers. Content already accepted triggers nothing.
    """
    now = time.time() if now is None else now
    if seen is None or seen.sha256 == state.accepted:
        return WatchState(state.accepted, None), None
    pending = state.pending
    same = pending is not None and (pending.sha256, pending.size, pending.mtime) == (seen.sha256, seen.size, seen.mtime)
    if same and seen.mtime >= 0 and now - seen.mtime >= quiet_s:
        return WatchState(seen.sha256, None), seen.sha256
    return WatchState(state.accepted, seen), None
