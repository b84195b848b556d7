"""Every turn-end reason droid 0.225.2 has maps to an error, the same in every dialect's envelope."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from droidpool import errors
from droidpool.api import anthropic, openai_chat, responses
from droidpool.core import failures
from droidpool.core.failures import failure_for

REASONS = json.loads((Path(__file__).parents[1] / "fixtures" / "droid_turn_end_reasons.json").read_text())["reasons"]

# reason → (status, OpenAI type, Anthropic status and type, code)
EXPECTED: dict[str, tuple[int, str, int, str, str]] = {
    "model_usage_exhausted": (429, "insufficient_quota", 429, "rate_limit_error", "insufficient_quota"),
    "model_rate_limited": (429, "rate_limit_error", 429, "rate_limit_error", "upstream_rate_limited"),
    "prompt_rejected": (400, "invalid_request_error", 400, "invalid_request_error", "droid_prompt_rejected"),
    "model_request_rejected": (400, "invalid_request_error", 400, "invalid_request_error",
                               "droid_model_request_rejected"),
    "permission_rejected": (403, "permission_error", 403, "permission_error", "droid_permission_rejected"),
    "structured_output_schema_invalid": (400, "invalid_request_error", 400, "invalid_request_error", "invalid_schema"),
    "structured_output_invalid": (502, "upstream_error", 502, "api_error", "structured_output_invalid"),
    "structured_output_missing": (502, "upstream_error", 502, "api_error", "structured_output_missing"),
    "model_provider_unavailable": (503, "server_error", 529, "overloaded_error", "droid_model_provider_unavailable"),
    "model_provider_unreachable": (502, "upstream_error", 502, "api_error", "droid_model_provider_unreachable"),
    "model_authentication_failed": (502, "upstream_error", 502, "api_error", "droid_model_authentication_failed"),
    "process_exit": (503, "server_error", 529, "overloaded_error", "droid_process_exit"),
    "cancelled": (502, "upstream_error", 502, "api_error", "droid_cancelled"),
    "completion_persistence_failed": (500, "server_error", 500, "api_error", "droid_completion_persistence_failed"),
    "no_approver_available": (500, "server_error", 500, "api_error", "droid_no_approver_available"),
    "error": (502, "upstream_error", 502, "api_error", "droid_error"),
}


def test_every_reason_of_droid_0_225_2_is_in_the_table() -> None:
    assert set(REASONS) == set(EXPECTED) | failures.SUCCESS_REASONS
    assert set(failures.TABLE) == set(EXPECTED)


@pytest.mark.parametrize("reason", sorted(EXPECTED))
def test_each_reason_maps_alike_in_every_dialect(reason: str) -> None:
    status, openai_type, anthropic_status, anthropic_type, code = EXPECTED[reason]
    error = failure_for(reason, ["BYOK Error: 4xx the provider's words"])
    assert error is not None and error.status == status and error.error_code == code
    assert "the provider's words" in error.message
    for dialect in (openai_chat.DIALECT, responses.DIALECT):
        got_status, body = dialect.error_body(error)
        assert (got_status, body["error"]["type"], body["error"]["code"]) == (status, openai_type, code)
    got_status, body = anthropic.DIALECT.error_body(error)
    assert (got_status, body["type"], body["error"]["type"]) == (anthropic_status, "error", anthropic_type)


def test_success_reasons_are_no_failure() -> None:
    assert failure_for("completed", []) is None and failure_for("spec_handoff", []) is None


def test_retry_after_where_waiting_helps() -> None:
    limited = failure_for("model_rate_limited", [])
    assert limited is not None and limited.headers()["Retry-After"] == "30"
    exhausted = failure_for("model_usage_exhausted", [])
    assert exhausted is not None and "Retry-After" not in exhausted.headers()
    assert "usage is exhausted" in exhausted.message


def test_a_rate_limit_that_says_the_quota_is_gone_is_insufficient_quota() -> None:
    error = failure_for("model_rate_limited", ["BYOK Error: 429 Your model provider's usage quota is exhausted."])
    assert isinstance(error, errors.QuotaExceeded) and error.error_code == "insufficient_quota"


@pytest.mark.parametrize(("words", "code"), [
    ("BYOK Error: 400 This model's maximum context length is 8192 tokens", "context_length_exceeded"),
    ("Request blocked by model provider safety checks.", "content_filter"),
    ("BYOK Error: 400 bad field", "droid_model_request_rejected"),
])
def test_rejected_requests_say_why(words: str, code: str) -> None:
    error = failure_for("model_request_rejected", [words])
    assert isinstance(error, errors.InvalidRequest) and error.error_code == code


def test_an_unknown_reason_is_a_502_logged_once() -> None:
    failures._unknown_seen.discard("brand_new_reason")
    with capture_logs() as logs:
        first = failure_for("brand_new_reason", [])
        failure_for("brand_new_reason", [])
    assert first is not None and first.status == 502 and first.error_code == "droid_brand_new_reason"
    assert [entry["reason"] for entry in logs if entry["event"] == "turn.unknown_failure_reason"] == ["brand_new_reason"]


def test_the_reasons_are_read_from_droids_binary(tmp_path: Path, real_droid: str) -> None:
    from droidpool.droid.launch import turn_end_reasons

    assert set(turn_end_reasons(real_droid) or ()) == set(REASONS)  # the fixture is what this droid has
    build = tmp_path / "droid"
    build.write_bytes(b"\0junk((q)=>{q.Completed=\"completed\";q.Odd=\"odd_one\";q.SpecHandoff=\"spec_handoff\";"
                      b"q.Later=\"later\"})(zz||={})junk")
    assert turn_end_reasons(str(build)) == ("completed", "odd_one", "spec_handoff", "later")
    (tmp_path / "script").write_text("#!/bin/sh\nexec droid \"$@\"\n")
    assert turn_end_reasons(str(tmp_path / "script")) is None
    assert turn_end_reasons(str(tmp_path / "missing")) is None
