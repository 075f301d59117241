"""Dagster's default run launcher (each run a process of the code server on this machine) with the worker check that
run monitoring needs: a run whose worker process is gone, killed or dead of an unreachable database, is marked failed.

In an instance's dagster.yaml (deploy/postgres/dagster.yaml):
`run_launcher: {module: saeseg_assets.launcher, class: LocalRunLauncher}`.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from dagster._core.events import DagsterEventType
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.launcher.default_run_launcher import DefaultRunLauncher
from dagster._core.storage.tags import GRPC_INFO_TAG

# The run worker's first event names its process id (dagster/_grpc/impl.py).
STARTED_PREFIX = "Started process for run (pid: "
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
DEBUG_LINES = 30


class LocalRunLauncher(DefaultRunLauncher):
    """Runs as DefaultRunLauncher does; run monitoring asks whether each run's worker process is still alive. Workers
    of a code server on another machine cannot be seen from here: those count as running."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        worker = worker_process(self._instance, run)
        if worker is None:
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no local worker process to check")
        pid, started = worker
        if process_alive(pid, started):
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(WorkerStatus.FAILED, f"the run's worker process {pid} is gone (killed, or it "
                                    "died without recording the end of the run, e.g. while the database was "
                                    "unreachable)")

    def get_run_worker_debug_info(self, run, include_container_logs: bool | None = True) -> str | None:
        """The last lines the run's steps wrote to stderr (their captured logs): why a worker died, where it said."""
        return captured_stderr_tail(self._instance, run.run_id)


def worker_process(instance, run) -> tuple[int, float] | None:
    """(process id, time it started) of a run's worker, if it ran on this machine and has started."""
    grpc_info = json.loads(run.tags.get(GRPC_INFO_TAG) or "{}")
    if grpc_info.get("host") not in LOCAL_HOSTS and not grpc_info.get("socket"):
        return None
    records = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=20).records
    for record in records:
        message = record.event_log_entry.message or ""
        if message.startswith(STARTED_PREFIX):
            return int(message[len(STARTED_PREFIX):].split(")")[0]), record.event_log_entry.timestamp
    return None


def process_alive(pid: int, not_after: float) -> bool:
    """Whether process `pid` exists, is not a zombie and started no later than `not_after` (a reused id is a new
    process). Without /proc, only whether the id exists."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    if fields[0] in ("Z", "X"):
        return False
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime"))
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return started <= not_after + 2  # btime and ticks are coarse


def captured_stderr_tail(instance, run_id: str, lines: int = DEBUG_LINES) -> str | None:
    """The last `lines` lines of each captured stderr file of a run (local compute logs), or None."""
    manager = instance.compute_log_manager
    base = getattr(manager, "_base_dir", None) or getattr(manager, "base_dir", None)
    if not base:
        return None
    tails = []
    for path in sorted(Path(base, run_id).glob("**/*.err")):
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
        if text:
            tails.append(f"{path.name}:\n" + "\n".join(text))
    return "\n\n".join(tails) or None
