"""One droid OS process: spawned in its own process group, its stderr tail, its stop sequence, reaping."""

from __future__ import annotations

import collections
import os
import signal
import subprocess

import anyio
import anyio.abc
import structlog

from .spec import LaunchSpec

STDERR_KEEP_BYTES = 16 * 1024


class DroidProcess:
    """A running droid and the children it starts. Whoever reads its stdout to the end calls
    ``reap``, which sets ``exited``; ``stop`` and ``kill`` signal the whole process group."""

    def __init__(self, process: anyio.abc.Process, stop_grace_s: float) -> None:
        self._process = process
        self._grace = stop_grace_s
        self._stderr: collections.deque[bytes] = collections.deque()
        self._stderr_size = 0
        self.exit_code: int | None = None
        self.exited = anyio.Event()

    @classmethod
    async def spawn(cls, spec: LaunchSpec) -> DroidProcess:
        """Start droid in a new session (its own process group); raises OSError."""
        process = await anyio.open_process(
            list(spec.argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=spec.cwd,
            env=dict(spec.env),
            start_new_session=True,
        )
        return cls(process, spec.stop_grace_s)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def stdout(self) -> anyio.abc.ByteReceiveStream:
        assert self._process.stdout is not None
        return self._process.stdout

    async def send(self, data: bytes) -> None:
        """Write to droid's stdin; raises anyio's broken/closed errors or OSError once it is gone."""
        assert self._process.stdin is not None
        await self._process.stdin.send(data)

    def stderr_tail(self, limit: int) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")[-limit:].strip()

    async def drain_stderr(self) -> None:
        """Keep the last ``STDERR_KEEP_BYTES`` of stderr, until droid closes it (a task of its own)."""
        structlog.contextvars.clear_contextvars()  # the worker's task, not the spawning request's
        assert self._process.stderr is not None
        try:
            async for chunk in self._process.stderr:
                self._stderr.append(chunk)
                self._stderr_size += len(chunk)
                while self._stderr_size > STDERR_KEEP_BYTES and len(self._stderr) > 1:
                    self._stderr_size -= len(self._stderr.popleft())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def stop(self) -> None:
        """Close stdin, then SIGTERM → grace → SIGKILL to the whole process group; returns once reaped."""
        process = self._process
        with anyio.CancelScope(shield=True):
            if process.stdin is not None:
                with anyio.move_on_after(0.5):
                    await process.stdin.aclose()
            with anyio.move_on_after(min(0.5, self._grace)):
                await self.exited.wait()
            if not self.exited.is_set():
                self.signal_group(signal.SIGTERM)
                with anyio.move_on_after(self._grace):
                    await self.exited.wait()
            # Tool subprocesses droid started may outlive it in the group: kill them too.
            self.signal_group(signal.SIGKILL)
            await self.exited.wait()

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self._process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    async def reap(self) -> int:
        """Wait for droid's exit status (SIGKILL if it lingers), kill what is left of its group, set
        ``exited``. Call it shielded, once its stdout has ended."""
        with anyio.move_on_after(self._grace + 2):
            self.exit_code = await self._process.wait()
        if self.exit_code is None:
            self.signal_group(signal.SIGKILL)
            self.exit_code = await self._process.wait()
        self.signal_group(signal.SIGKILL)
        self.exited.set()
        return self.exit_code
