"""The real droid under the sandboxing the systemd unit applies: what it tolerates.

ProtectSystem=strict is approximated with a private mount namespace whose root is read-only
except the state directory; MemoryDenyWriteExecute= with prctl(PR_SET_MDWE) (refuse to gain
exec on writable memory); NoNewPrivileges= with prctl(PR_SET_NO_NEW_PRIVS).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import FakeLLMProcess, write_droid_home

pytestmark = pytest.mark.real_droid

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

SANDBOX = """
set -e
mount --make-rprivate /
mount --bind "$STATE" "$STATE"
mount -o remount,bind,ro /
mount -o remount,bind,rw "$STATE"
if touch /usr/.droidpool-probe 2>/dev/null; then echo "root still writable" >&2; exit 97; fi
exec "$@"
"""


def restrict() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_MDWE")


def sandbox_available() -> bool:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


def rpc(request_id: str, method: str, params: dict[str, object]) -> bytes:
    return (json.dumps({"jsonrpc": "2.0", "factoryApiVersion": "1.0.0", "type": "request",
                        "id": request_id, "method": method, "params": params}) + "\n").encode()


def test_droid_runs_a_turn_read_only_without_wx_memory_or_new_privileges(
    tmp_path: Path, real_droid: str, fake_llm: FakeLLMProcess
) -> None:
    if not sandbox_available():
        pytest.skip("mount namespaces are not permitted here")
    state = tmp_path / "state"
    home = write_droid_home(state / "home", fake_llm.url)
    workdir = state / "work"
    workdir.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "STATE": str(state),
           "FACTORY_AIRGAP_ENABLED": "1", "FACTORY_LOG_FILE": "/dev/null"}
    process = subprocess.Popen(
        ["unshare", "-m", "bash", "-c", SANDBOX, "sandbox", real_droid,
         "exec", "--input-format", "stream-jsonrpc", "--output-format", "stream-jsonrpc"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        cwd=str(workdir), preexec_fn=restrict,
    )
    assert process.stdin is not None and process.stdout is not None
    text, reason = "", None
    try:
        process.stdin.write(rpc("1", "droid.initialize_session", {
            "machineId": "m", "cwd": str(workdir), "modelId": "custom:fake-paced"}))
        process.stdin.flush()
        deadline = time.monotonic() + 60
        while reason is None and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.5)
            if not ready:
                continue
            line = process.stdout.readline()
            if not line:
                break
            message = json.loads(line)
            if message.get("type") == "response" and message.get("id") == "1":
                assert "error" not in message, message
                process.stdin.write(rpc("2", "droid.add_user_message", {"text": "hello from a sandbox"}))
                process.stdin.flush()
            note = message.get("params", {}).get("notification", {})
            if note.get("type") == "assistant_text_delta":
                text += note["textDelta"]
            if note.get("type") == "agent_turn_completed":
                reason = note["reason"]
    finally:
        process.kill()
        _, stderr = process.communicate(timeout=10)
    assert reason == "completed", stderr.decode()[-500:]
    assert text.strip()
