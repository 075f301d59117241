"""Where the per-class work runs: on one torch thread per process (it is many small tensor ops, for which intra-op
threads cost more in synchronisation than they save), and for many classes in worker processes side by side.

Workers are forked once the run's shared inputs are loaded, so every worker reads the same memory (copy on write:
the study never writes to them) instead of loading or receiving its own copy. Each class's report is a function of
the inputs, the class and the settings alone, so the reports do not depend on the number of workers."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Iterator

import torch

from ..report.results import ClassReport, Selection
from ..settings import SuppressionSettings

Job = tuple[int, Selection, dict[str, tuple[int, ...]]]  # (class index, selection, rankings)
_SHARED: tuple | None = None  # (model, tuning, config) in a forked worker


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Runs the block on one torch thread (15x faster than 2 threads on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def study_classes(model, tuning, jobs: list[Job], config: SuppressionSettings = SuppressionSettings(),
                  workers: int = 1) -> Iterator[tuple[ClassReport, float]]:
    """Each job's report and the seconds its study took, in the jobs' order, studied in `workers` forked processes
    (1, or where processes cannot be forked: in this one)."""
    global _SHARED
    workers = min(workers, len(jobs))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for job in jobs:
            yield _timed(model, tuning, job, config)
        return
    _SHARED = (model, tuning, config)
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield from pool.imap(_study, jobs)
    finally:
        _SHARED = None


def _timed(model, tuning, job: Job, config: SuppressionSettings) -> tuple[ClassReport, float]:
    from .class_study import study_class

    start = time.perf_counter()
    report = study_class(model, tuning, *job, config)
    return report, time.perf_counter() - start


def _study(job: Job) -> tuple[ClassReport, float]:
    model, tuning, config = _SHARED
    return _timed(model, tuning, job, config)
