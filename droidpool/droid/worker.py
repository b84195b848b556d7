"""One long-lived ``droid exec`` stream-jsonrpc process as the pool sees it: its state, its
JSON-RPC requests, and the turns it runs."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from droidpool import errors

from . import images
from .lines import LineReader, LineTooLong
from .process import DroidProcess
from .protocol import (
    Message,
    PermissionAsked,
    ProtocolError,
    Response,
    ServerRequest,
    TurnCompleted,
    UserMessage,
    encode_request,
    encode_response,
    parse_line,
    tool_uses,
    turn_event,
)
from .rpc import DroidRequestError, PendingCalls
from .spec import LaunchSpec, SessionSettings
from .turnstream import ParkPolicy, TurnChannel, TurnStream

# The worker's vocabulary, importable from here as well as from the modules that own it.
__all__ = ["REQUEST_TIMEOUT_S", "DroidRequestError", "LaunchSpec", "ParkPolicy", "SessionSettings",
           "TurnStream", "Worker", "WorkerState"]

log = structlog.get_logger(__name__)

REQUEST_TIMEOUT_S = 30.0


class WorkerState(enum.Enum):
    STARTING = "starting"  # spawned, not yet answering
    READY = "ready"  # a spare: holds no conversation (in fresh mode: has never held one)
    BUSY = "busy"  # leased to a request
    IDLE = "idle"  # holds a conversation's session
    STOPPING = "stopping"
    DEAD = "dead"


_ids = itertools.count(1)


class Worker:
    """A droid process. The pool owns it and changes ``state``; requests go one at a time."""

    def __init__(self, spec: LaunchSpec, model_id: str | None = None) -> None:
        self.id = next(_ids)
        self.spec = spec
        self.state = WorkerState.STARTING
        self.model_id = model_id
        self.settings: SessionSettings | None = None
        self.session_id: str | None = None
        self.image_dir: str | None = None  # droid's temp folder for the images it was sent (images.py)
        self.used = False  # has loaded a session or run a turn: initialize_session would leak
        self.turns = 0
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self.available_models: list[dict[str, Any]] = []
        self.rss = 0  # bytes, of the whole process group; measured by the pool
        self.session_dir: Path | None = None
        self.mcp_servers: list[dict[str, Any]] = []  # the servers droid was last given (load_session)
        self._process: DroidProcess | None = None
        self._write_lock = anyio.Lock()
        self._call_lock = anyio.Lock()
        self._pending = PendingCalls()
        self._turn: TurnChannel | None = None
        self.on_exit: Callable[[Worker], None] | None = None

    def __repr__(self) -> str:
        session = f" session={self.session_id[:8]}" if self.session_id else ""
        return f"<Worker #{self.id} {self.state.value} pid={self.pid} model={self.model_id}{session} turns={self.turns}>"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and not self._process.exited.is_set()

    @property
    def exit_code(self) -> int | None:
        return self._process.exit_code if self._process else None

    def stderr_tail(self, limit: int = 2000) -> str:
        return self._process.stderr_tail(limit) if self._process else ""

    # --- process lifecycle -------------------------------------------------------------------

    async def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """Spawn droid in its own process group; its reader tasks join ``task_group``."""
        try:
            self._process = await DroidProcess.spawn(self.spec)
        except OSError as exc:
            self.state = WorkerState.DEAD
            raise errors.Unavailable(f"cannot start droid ({self.spec.argv[0]}): {exc.strerror or exc}") from exc
        task_group.start_soon(self._read_stdout, self._process)
        task_group.start_soon(self._process.drain_stderr)
        log.debug("worker.spawned", worker=self.id, pid=self._process.pid)

    async def initialize(self, settings: SessionSettings, timeout: float,
                         mcp_servers: list[dict[str, Any]] | None = None) -> str:
        """Start a fresh droid session; only valid while the process has held no conversation."""
        assert not self.used, "initialize_session after a turn leaks the old context"
        # Each session works in a directory of its own (droid keeps it across load_session).
        workdir = Path(self.spec.cwd) / "sessions" / uuid.uuid4().hex
        workdir.mkdir(parents=True, mode=0o700)
        params = settings.init_params(self.spec.machine_id, str(workdir))
        if mcp_servers is not None:
            params["mcpServers"] = mcp_servers
        result = await self.call("droid.initialize_session", params, timeout)
        if mcp_servers is not None:
            self.mcp_servers = mcp_servers
        session_id = result.get("sessionId")
        if not isinstance(session_id, str):
            raise errors.UpstreamError("droid.initialize_session returned no sessionId")
        if self.spec.session_title:
            # A title set before the first message stops droid's extra title request upstream.
            await self.call("droid.rename_session", {"title": self.spec.session_title}, timeout)
        models = result.get("availableModels")
        self.available_models = models if isinstance(models, list) else []
        self.settings = settings
        self.session_id = session_id
        self.session_dir = workdir
        self.model_id = settings.model_id
        return session_id

    async def load_session(self, session_id: str, timeout: float = REQUEST_TIMEOUT_S,
                           mcp_servers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Switch the process to a stored session (droid replaces its in-memory history), with
        these MCP servers (droid swaps a process's servers; an empty list keeps the old ones)."""
        self.used = True  # whatever droid answers: never initialize_session in this process again
        params: dict[str, Any] = {"sessionId": session_id}
        if mcp_servers is not None:
            params["mcpServers"] = mcp_servers
        result = await self.call("droid.load_session", params, timeout)
        if mcp_servers is not None:
            self.mcp_servers = mcp_servers
        self.session_id = session_id
        self.settings = None
        models = result.get("settings", {}).get("modelId") if isinstance(result.get("settings"), dict) else None
        self.model_id = models if isinstance(models, str) else self.model_id
        return result

    def adopt(self, settings: SessionSettings, session_dir: Path) -> None:
        """The loaded session is a new one droidpool wrote with ``settings``."""
        self.settings = settings
        self.model_id = settings.model_id
        self.session_dir = session_dir

    async def set_model(self, model_id: str, timeout: float = REQUEST_TIMEOUT_S) -> None:
        await self.call("droid.update_session_settings", {"modelId": model_id}, timeout)
        self.model_id = model_id
        if self.settings is not None:
            self.settings = dataclasses.replace(self.settings, model_id=model_id)

    async def set_reasoning_effort(self, effort: str, timeout: float = REQUEST_TIMEOUT_S) -> None:
        await self.call("droid.update_session_settings", {"reasoningEffort": effort}, timeout)

    async def list_models(self, timeout: float = REQUEST_TIMEOUT_S) -> list[dict[str, Any]]:
        result = await self.call("droid.list_models", {}, timeout)
        models = result.get("models")
        return models if isinstance(models, list) else []

    async def stop(self) -> None:
        """Close stdin, then SIGTERM → grace → SIGKILL to the whole process group; always reaped."""
        if self._process is None:
            self.state = WorkerState.DEAD
            return
        self.state = WorkerState.STOPPING
        await self._process.stop()  # shielded from cancellation
        self.state = WorkerState.DEAD

    def kill(self) -> None:
        """Immediate SIGKILL of the group; the reader task reaps."""
        if self._process is not None:
            self._process.signal_group(signal.SIGKILL)

    # --- requests ----------------------------------------------------------------------------

    async def call(self, method: str, params: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """Send one request and wait for its response; droid needs them one at a time."""
        async with self._call_lock:
            if not self.alive:
                raise errors.WorkerCrashed(self._death_message())
            request_id = f"dp-{self.id}-{next(_ids)}"
            with self._pending.expect(request_id) as reply:
                await self._write(encode_request(request_id, method, params))
                # The reaper wakes every pending request when the process exits.
                with anyio.move_on_after(timeout) as scope:
                    await reply.arrived.wait()
                if scope.cancelled_caught:
                    raise errors.DeadlineExceeded(f"droid did not answer {method} within {timeout:g} s")
            response = reply.response
            if response is None:
                raise errors.WorkerCrashed(self._death_message())
            if response.error is not None:
                raise DroidRequestError(method, response.error)
            return response.result or {}

    async def _write(self, data: bytes) -> None:
        assert self._process is not None
        async with self._write_lock:
            try:
                await self._process.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise errors.WorkerCrashed(self._death_message()) from exc

    def _death_message(self) -> str:
        tail = self.stderr_tail(500)
        code = f" (exit code {self.exit_code})" if self.exit_code is not None else ""
        return f"droid worker #{self.id} exited{code}" + (f": {tail}" if tail else "")

    # --- turns -------------------------------------------------------------------------------

    @asynccontextmanager
    async def turn(self, message: UserMessage | str, interrupt_grace_s: float,
                   park: ParkPolicy | None = None) -> AsyncIterator[TurnStream]:
        """Run one turn; leaving early interrupts it and waits until droid reports it done.

        If droid does not stop within the grace, the worker is killed (and then reaped).
        Permission requests ``park`` accepts come to the turn as ``PermissionAsked`` events and
        wait for ``answer_permission``; the others are answered by the launch policy.
        """
        if isinstance(message, str):
            message = UserMessage(message)
        turn = TurnChannel(park)
        self._turn = turn
        self.last_used = time.monotonic()
        try:
            self.used = True
            await self.call("droid.add_user_message", message.params())
            self.turns += 1
            yield TurnStream(turn, self._death_message)
        finally:
            turn.abandoned = True
            turn.receive.close()
            with anyio.CancelScope(shield=True):
                await self._finish_turn(turn, interrupt_grace_s)
                if message.images and self.image_dir is None and self.session_id and self.spec.sessions_dir:
                    self.image_dir = await anyio.to_thread.run_sync(
                        images.owned_dir, Path(self.spec.sessions_dir), self.session_id)
            self._turn = None
            self.last_used = time.monotonic()

    async def _finish_turn(self, turn: TurnChannel, grace: float) -> None:
        if turn.done.is_set() or not self.alive:
            return
        deadline = time.monotonic() + grace
        try:
            # An interrupt that reaches droid before the turn has really started is a no-op,
            # so it is repeated until droid reports the turn over.
            wait = 0.1
            while not turn.done.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                await self.call("droid.interrupt_session", {}, timeout=remaining)
                with anyio.move_on_after(min(wait, max(0.0, deadline - time.monotonic()))):
                    await turn.done.wait()
                wait = min(wait * 2, 1.0)
            log.info("worker.turn_interrupted", worker=self.id)
        except (errors.DroidpoolError, DroidRequestError, TimeoutError):
            log.warning("worker.interrupt_failed_killing", worker=self.id)
            self.kill()
            assert self._process is not None  # alive above
            await self._process.exited.wait()

    # --- reading droid's stdout --------------------------------------------------------------

    async def _read_stdout(self, process: DroidProcess) -> None:
        # A task of the worker's own: it must not log under the request that happened to spawn it.
        structlog.contextvars.clear_contextvars()
        reader = LineReader(process.stdout, self.spec.max_line_bytes)
        try:
            while True:
                try:
                    line = await reader.readline()
                except LineTooLong as exc:
                    log.warning("worker.line_too_long", worker=self.id, error=str(exc))
                    continue
                if line is None:
                    break
                if not line.strip():
                    continue
                try:
                    message = parse_line(line)
                except ProtocolError as exc:
                    log.warning("worker.bad_line", worker=self.id, error=str(exc), line=line[:200].decode("utf-8", "replace"))
                    continue
                await self._dispatch(message)
        finally:
            with anyio.CancelScope(shield=True):
                await process.reap()
                self._exited(process)

    def _exited(self, process: DroidProcess) -> None:
        """The process is reaped: fail whatever still waits on it."""
        if self.state is not WorkerState.STOPPING:
            log.warning("worker.exited", worker=self.id, pid=process.pid, code=process.exit_code, stderr=self.stderr_tail(300))
        if self.on_exit is not None:
            self.on_exit(self)
        self.state = WorkerState.DEAD
        self._pending.abandon_all()
        turn = self._turn
        if turn is not None and not turn.done.is_set():
            # The consumer drains what was buffered, then sees the end of a turn that never
            # completed: TurnStream turns that into WorkerCrashed.
            turn.send.close()
            turn.done.set()

    async def _dispatch(self, message: Message) -> None:
        if isinstance(message, Response):
            self._pending.resolve(message)
            return
        if isinstance(message, ServerRequest):
            await self._answer(message)
            return
        turn = self._turn
        if turn is None or turn.done.is_set():
            return
        if message.session_id and self.session_id and message.session_id != self.session_id:
            return
        event = turn_event(message)
        if event is None:
            return
        if not turn.abandoned:
            try:
                await turn.send.send(event)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
        if isinstance(event, TurnCompleted):
            turn.completed = event
            turn.done.set()

    async def answer_permission(self, request_id: Any, option: str) -> None:
        """Answer a permission request the turn took (``proceed_once`` or ``cancel``; never the
        ``proceed_always*`` ones, which write a global file)."""
        assert option in ("proceed_once", "cancel")
        log.info("worker.permission_answered", worker=self.id, answer=option)
        await self._write(encode_response(request_id, {"selectedOption": option}))

    async def _answer(self, request: ServerRequest) -> None:
        turn = self._turn
        if request.method == "droid.request_permission" and turn is not None and turn.park is not None \
                and not turn.done.is_set():
            asked = PermissionAsked(request.id, tool_uses(request.params))
            if asked.tool_uses and turn.park(asked):
                try:
                    await turn.send.send(asked)
                    return
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass  # nobody listens any more: answered by policy below
        if request.method == "droid.request_permission":
            result: dict[str, Any] = {"selectedOption": self.spec.permission_policy}
        elif request.method == "droid.ask_user":
            result = {"cancelled": True, "answers": []}
        else:
            result = {}
        log.info("worker.server_request", worker=self.id, method=request.method, answer=result)
        try:
            await self._write(encode_response(request.id, result))
        except errors.WorkerCrashed:
            pass
