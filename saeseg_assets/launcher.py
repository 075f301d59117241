"""Dagster's default run launcher (each run a process of the code server on this machine) with the worker check that
run monitoring needs: a run whose worker process is gone, killed or dead of an unreachable database, is marked failed.

In an instance's dagster.yaml (deploy/postgres/dagster.yaml):
`run_launcher: {module: saeseg_assets.launcher, class: LocalRunLauncher}`.
"""

from __future__ import annotations

import json
import os
import socket
import weakref
from pathlib import Path

import dagster as dg

# Dagster has no public names for these, nor another way to the same facts: the result type run monitoring expects
# from check_run_worker_health, the run tag in which DefaultRunLauncher notes the code server that starts the worker,
# and the worker's first event, whose message names its process id (dagster/_grpc/impl.py).
# test_dagster_internals.py fails, naming which, if Dagster changes any of them.
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.tags import GRPC_INFO_TAG

STARTED_PREFIX = "Started process for run (pid: "
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
DEBUG_LINES = 30


class LocalRunLauncher(dg.DefaultRunLauncher):
    """Runs as DefaultRunLauncher does; run monitoring asks whether each run's worker process is still alive. Workers
    of a code server on another machine cannot be seen from here: those count as running."""

    def register_instance(self, instance: dg.DagsterInstance) -> None:
        super().register_instance(instance)
        # Weak, as Dagster's own reference: the instance owns its launcher.
        self._launcher_instance = weakref.ref(instance)

    @property
    def instance(self) -> dg.DagsterInstance:
        instance = self._launcher_instance()
        if instance is None:
            raise RuntimeError("the Dagster instance of this run launcher is gone")
        return instance

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        worker = worker_process(self.instance, run)
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
        return captured_stderr_tail(self.instance, run.run_id)


def worker_process(instance, run) -> tuple[int, float] | None:
    """(process id, time it started) of a run's worker, if it ran on this machine and has started."""
    grpc_info = json.loads(run.tags.get(GRPC_INFO_TAG) or "{}")
    if grpc_info.get("host") not in LOCAL_HOSTS and not grpc_info.get("socket"):
        return None
    records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=20).records
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


def captured_stderr_tail(instance: dg.DagsterInstance, run_id: str, lines: int = DEBUG_LINES) -> str | None:
    """The last `lines` lines of stderr of each process that ran steps of a run (their captured logs, as the UI
    shows them), under the steps' names; None if there are none."""
    manager = instance.compute_log_manager
    tails = []
    for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.LOGS_CAPTURED):
        captured = event.dagster_event.logs_captured_data
        stderr = manager.get_log_data(manager.build_log_key_for_run(run_id, captured.file_key)).stderr
        text = (stderr or b"").decode(errors="replace").strip().splitlines()[-lines:]
        if text:
            tails.append(f"{', '.join(captured.step_keys)}:\n" + "\n".join(text))
    return "\n\n".join(tails) or None
