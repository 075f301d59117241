"""A throwaway PostgreSQL server, for the PostgreSQL tests and the backfill benchmark: Debian's `postgresql` binaries,
a temporary data folder, a free localhost port; run as `postgres` when run as root (initdb and postgres refuse root)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

DATABASE = "dagster"
USER = "postgres"


def find_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin with initdb, or the folder of an initdb on PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One server on 127.0.0.1:<port> with trust authentication and one database, `dagster`."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.port = _free_port()
        # Root may not run the server: the files belong to `postgres` then, in a folder it can reach.
        self.as_user = USER if os.geteuid() == 0 else None
        # In /tmp when run as another user: a TMPDIR under /root would be out of its reach.
        self.root = Path(tempfile.mkdtemp(prefix="saeseg_pg_", dir="/tmp" if self.as_user else None))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        if self.as_user:
            entry = pwd.getpwnam(self.as_user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_user:
            command = ["runuser", "-u", self.as_user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}{log}")
        return done

    def init(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "--encoding=UTF8", "--no-sync")
        # Localhost TCP only, no socket in /var/run; fsync off: a test server need not survive a power cut.
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = ''\n"
                       "fsync = off\nmax_connections = 200\n")
        self.start()
        self.create_database(DATABASE)
        return self

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new database, empty or a copy of `template` (which no one may be connected to)."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER,
                  *(["-T", template] if template else []), name)
        return name

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stops the server (`immediate`: as after a crash, without a checkpoint; the WAL replays at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def env(self, database: str = DATABASE) -> dict[str, str]:
        """The variables deploy/postgres/dagster.yaml reads."""
        return {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USERNAME": USER,
                "DAGSTER_PG_PASSWORD": "unused-with-trust-auth", "DAGSTER_PG_DB": database}
