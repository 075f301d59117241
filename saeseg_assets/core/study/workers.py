"""Where the per-class work runs: on one torch thread per process (it is many small tensor ops, for which intra-op
threads cost more in synchronisation than they save), and for many classes in worker processes side by side.

Workers are started fresh (spawned: a fork of a process with threads, such as a Dagster run's, can deadlock) and get
the run's shared inputs as torch tensors in shared memory: the tensors move to shared memory once and every worker maps
the same pages, with no copy per worker. Each class's report is a function of the inputs, the class and the settings
alone, so the reports do not depend on the number of workers. A worker that dies fails the run, naming the class."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch
import torch.multiprocessing as torch_mp

from ..report.results import ClassReport, Selection
from ..settings import SuppressionSettings

Job = tuple[int, Selection, dict[str, tuple[int, ...]]]  # (class index, selection, rankings)
_SHARED: tuple | None = None  # (model, tuning, config) in a worker
_TRIM = None  # glibc's malloc_trim, once looked up (False: none)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Runs the block on one torch thread (15x faster than 2 threads on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def release_memory() -> None:
    """Hands the heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere). A class's study frees
    hundreds of megabytes of blocks of every size, which the allocator keeps as free heap otherwise: the next class's
    peak would stand on them."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


def machine_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def study_classes(model, tuning, jobs: list[Job], config: SuppressionSettings = SuppressionSettings(),
                  workers: int = 1) -> Iterator[tuple[ClassReport, float]]:
    """Each job's report and the seconds its study took, in the jobs' order, studied in `workers` worker processes
    (1: in this one)."""
    workers = min(workers, len(jobs))
    if workers <= 1:
        for job in jobs:
            yield _timed(model, tuning, job, config)
        return
    with ProcessPoolExecutor(workers, mp_context=torch_mp.get_context("spawn"), initializer=_start,
                             initargs=(model, tuning, config)) as pool:
        futures = [pool.submit(_study, job) for job in jobs]
        for job, future in zip(jobs, futures):
            try:
                yield future.result()
            except BrokenProcessPool as exc:
                raise RuntimeError(f"a class-study worker died (killed for memory?) while class {job[0]} was "
                                   "studied or waited: set SAESEG_CLASS_WORKERS lower") from exc


def _start(model, tuning, config: SuppressionSettings) -> None:
    """A worker's start: one torch thread, and the shared inputs it was given."""
    global _SHARED
    torch.set_num_threads(1)
    _SHARED = (model, tuning, config)


def _timed(model, tuning, job: Job, config: SuppressionSettings) -> tuple[ClassReport, float]:
    from .class_study import study_class

    start = time.perf_counter()
    report = study_class(model, tuning, *job, config)
    release_memory()
    return report, time.perf_counter() - start


def _study(job: Job) -> tuple[ClassReport, float]:
    model, tuning, config = _SHARED
    return _timed(model, tuning, job, config)
