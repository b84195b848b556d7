"""A real PostgreSQL server for the tests: Debian's ``postgresql`` package, initdb into a temporary
directory, run as an unprivileged user on a loopback port, password authentication, stopped and
removed on the way out."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

USER = "droidpool"


def binaries() -> Path | None:
    """The newest installed server's bin directory (``/usr/lib/postgresql/<n>/bin``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """``start()`` it, read ``url``, ``stop()`` it. PostgreSQL refuses to run as root, so as root
    the server runs as ``nobody``."""

    def __init__(self) -> None:
        bin_dir = binaries()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="droidpool-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.password = uuid.uuid4().hex
        self.url = f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/droidpool"
        self._as: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            self._as = ["runuser", "-u", "nobody", "--"]

    def _run(self, *argv: str, timeout: float = 60) -> None:
        subprocess.run([*self._as, *argv], check=True, capture_output=True, timeout=timeout, cwd=self.root)

    def start(self) -> PostgresServer:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self._as:
            nobody = pwd.getpwnam("nobody")
            os.chown(pwfile, nobody.pw_uid, nobody.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
                  "--auth", "scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "-t", "60", "start")
        env = {**os.environ, "PGPASSWORD": self.password}
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "droidpool"],
                       check=True, capture_output=True, timeout=30, env=env)
        return self

    def database(self) -> str:
        """A new empty database on this server, for one test's isolation; its URL."""
        name = "t" + uuid.uuid4().hex[:12]
        env = {**os.environ, "PGPASSWORD": self.password}
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name],
                       check=True, capture_output=True, timeout=30, env=env)
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            if self.data.exists():
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
