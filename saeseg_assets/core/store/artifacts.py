"""The content-addressed artifact store: every output lives in `<root>/<asset>/<key>/` (per class below it for the
class-partitioned assets), key = hash(format version, effective settings, input keys), published whole by a rename.

A folder that exists is complete: reuse needs no other check, and nothing is ever overwritten in place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
_log = logging.getLogger(__name__)
_TEMPORARY = ".tmp"  # unfinished writes, removed on failure
_PARTIAL = ".partial"  # unfinished resumable writes (recordings, SAE training), kept to resume
LOCK_TIMEOUT_S = 24 * 3600.0  # how long a writer waits for another run writing the same output
_held = threading.local()  # the writer locks this thread holds, so that write() inside lock() does not wait on itself


def write_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def link_atomic(link: Path, target: Path) -> None:
    """Points the symbolic link `link` at `target` (relative to the link's folder), replacing any old link at once."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


class ArtifactMissing(FileNotFoundError):
    """An artifact that is not in the store (never made, or pruned)."""


class WriterConflict(RuntimeError):
    """Another run is writing (or wrote, while this one waited) the same output."""


@dataclass(frozen=True)
class OutputSpec:
    """What decides one asset's output: the format versions of the code that writes it (one number, or one per
    writing module), its effective settings and the keys of its inputs."""

    asset: str
    version: int | dict[str, int]
    settings: dict
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """16 hex digits of sha256 over the spec: equal keys mean equal content."""
        blob = json.dumps(self.manifest(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def manifest(self) -> dict:
        return {"asset": self.asset, "version": self.version, "settings": self.settings, "inputs": self.inputs}


class Store:
    """Artifacts under one root folder. `write()` publishes a folder atomically; `open()` refuses what is missing."""

    def __init__(self, root: Path | str, lock_timeout_s: float = LOCK_TIMEOUT_S):
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s

    def path(self, asset: str, key: str, part: str | None = None) -> Path:
        folder = self.root / asset / key
        return folder / part if part else folder

    def exists(self, asset: str, key: str, part: str | None = None) -> bool:
        return (self.path(asset, key, part) / MANIFEST).is_file()

    def open(self, asset: str, key: str, part: str | None = None) -> Path:
        """The folder of a complete artifact; an error naming it and what to do when there is none."""
        folder = self.path(asset, key, part)
        if not (folder / MANIFEST).is_file():
            what = f"{asset} {part}" if part else asset
            raise ArtifactMissing(f"{folder}: no complete {what} with key {key} (pruned, or never finished): "
                                  f"materialize {asset} again")
        return folder

    def manifest(self, asset: str, key: str, part: str | None = None) -> dict:
        return json.loads((self.open(asset, key, part) / MANIFEST).read_text())

    def inputs(self, asset: str, key: str, part: str | None = None) -> dict[str, str]:
        """The keys of the inputs an artifact was made from."""
        return self.manifest(asset, key, part)["inputs"]

    def _partial(self, spec: OutputSpec, part: str | None) -> Path:
        return self.root / spec.asset / _PARTIAL / (f"{spec.key}-{part}" if part else spec.key)

    @contextmanager
    def lock(self, spec: OutputSpec, part: str | None = None,
             log: Callable[[str], None] | None = None) -> Iterator[None]:
        """Holds the writer lock of one output (an flock on a file beside its partial folder), waiting up to
        `lock_timeout_s` for another run that holds it; the lock goes with the process, even one killed with -9.
        Check `exists()` inside it to reuse what the other run published. Reentrant within a thread."""
        partial = self._partial(spec, part)
        held = _held.__dict__.setdefault("paths", set())
        if partial in held:
            yield
            return
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial.with_name(partial.name + ".lock"), "a") as lock_file:
            deadline, waiting = time.monotonic() + self.lock_timeout_s, False
            while True:
                try:
                    fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise WriterConflict(f"{partial}: another run has been writing this {spec.asset} for longer "
                                             f"than {self.lock_timeout_s:.0f} s (lock {lock_file.name}); wait for "
                                             "it to finish, or stop it, and materialize again") from None
                    if not waiting:
                        (log or _log.warning)(f"waiting for another run that writes {partial} (lock "
                                              f"{lock_file.name})")
                        waiting = True
                    time.sleep(0.2)
            held.add(partial)
            try:
                yield
            finally:
                held.discard(partial)
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    @contextmanager
    def write(self, spec: OutputSpec, part: str | None = None, resumable: bool = False,
              log: Callable[[str], None] | None = None) -> Iterator[Path]:
        """Yields an empty (or, if `resumable`, a half-written earlier) folder to fill; on success, adds the manifest
        and renames the folder into place. If another writer published the same key first, its folder is kept: equal
        keys mean equal content. A failure removes the folder, unless `resumable` (it is then resumed next time).
        A resumable write holds the output's `lock()` throughout, so two runs never share its partial folder."""
        asset, key = spec.asset, spec.key
        final = self.path(asset, key, part)
        name = f"{key}-{part}" if part else key
        with ExitStack() as held:
            if resumable:
                held.enter_context(self.lock(spec, part, log))
                if self.exists(asset, key, part):
                    raise WriterConflict(f"{final} is already published (by another run, while this one waited "
                                         "for it): materialize again to reuse it")
                work = self._partial(spec, part)
            else:
                work = self.root / asset / _TEMPORARY / f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            work.mkdir(parents=True, exist_ok=True)
            try:
                yield work
                write_atomic(work / MANIFEST, json.dumps({**spec.manifest(), "key": key, "part": part},
                                                         indent=2, sort_keys=True).encode())
                final.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(work, final)
                except OSError:
                    if not self.exists(asset, key, part):
                        raise
                    shutil.rmtree(work, ignore_errors=True)  # a concurrent writer published the same content first
            except BaseException:
                if not resumable:
                    shutil.rmtree(work, ignore_errors=True)
                raise

    def keys(self, asset: str) -> list[str]:
        """Keys present for an asset (complete or, for partitioned assets, with at least one complete part)."""
        folder = self.root / asset
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def newest(self, asset: str, part: str | None = None) -> Path | None:
        """The most recently published complete folder of an asset, for tools that run without the Dagster instance
        (benchmarks); the pipeline itself always reads the keys its instance recorded."""
        manifests = [self.path(asset, key, part) / MANIFEST for key in self.keys(asset)]
        manifests = [m for m in manifests if m.is_file()]
        return max(manifests, key=lambda m: m.stat().st_mtime).parent if manifests else None

    def prune(self, keep: dict[str, set[str]], dry_run: bool = False) -> list[Path]:
        """Removes every key folder of the assets in `keep` that is not kept, and their leftover temporary and
        partial writes; returns what was (or, with `dry_run`, would be) removed."""
        removed = []
        for asset, kept in keep.items():
            folder = self.root / asset
            if not folder.is_dir():
                continue
            stale = [folder / key for key in self.keys(asset) if key not in kept]
            stale += [p for p in (folder / _TEMPORARY, folder / _PARTIAL) if p.exists()]
            for path in stale:
                if not dry_run:
                    shutil.rmtree(path)
                removed.append(path)
        return removed
