"""droid's turn-end reasons (``agent_turn_completed``) → the error a client sees, in one table.

droid 0.225.2 ends a turn with one of 18 reasons (``tests/fixtures/droid_turn_end_reasons.json``,
read from its binary by ``droid/launch.turn_end_reasons``). The table says, for each failure, the
neutral error (and so the status in every dialect), its code, and what the client is told; droid's
own words (its error notification and user-only system message) follow. A reason the table does
not know is a 502 naming it, logged once per reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from droidpool import errors

log = structlog.get_logger(__name__)

# Reasons after which the turn has its answer.
SUCCESS_REASONS = frozenset({"completed", "spec_handoff"})


@dataclass(frozen=True)
class Failure:
    error: type[errors.DroidpoolError]
    code: str | None  # None: droid_<reason>
    message: str  # what the client is told before droid's own words
    retry_after: float | None = None


TABLE: dict[str, Failure] = {
    "model_usage_exhausted": Failure(
        errors.QuotaExceeded, "insufficient_quota",
        "The model account's usage is exhausted (the provider answered 402): requests fail until its limit "
        "is raised or resets."),
    "model_rate_limited": Failure(
        errors.UpstreamRateLimited, "upstream_rate_limited",
        "The model provider rate-limited droid, and droid's retries did not get through.", retry_after=30),
    "prompt_rejected": Failure(errors.InvalidRequest, None, "droid refused the prompt."),
    "model_request_rejected": Failure(
        errors.InvalidRequest, None, "The model provider rejected the request."),
    "permission_rejected": Failure(
        errors.Forbidden, None, "A tool the turn needed was not permitted."),
    "structured_output_schema_invalid": Failure(
        errors.InvalidRequest, "invalid_schema", "droid could not use the requested JSON schema."),
    "structured_output_invalid": Failure(
        errors.StructuredOutputFailed, "structured_output_invalid",
        "The model's answer did not match the requested JSON schema after droid asked it to correct it "
        "twice."),
    "structured_output_missing": Failure(
        errors.StructuredOutputFailed, "structured_output_missing",
        "The model gave no structured answer for the requested JSON schema."),
    "model_provider_unavailable": Failure(
        errors.Unavailable, None,
        "The model provider is unavailable (server errors or timeouts, after droid's retries).", retry_after=30),
    "model_provider_unreachable": Failure(
        errors.UpstreamError, None, "droid cannot reach the model provider."),
    "model_authentication_failed": Failure(
        errors.UpstreamError, None,
        "The model provider refused droid's credentials (this is droid's upstream key, not your API key)."),
    "process_exit": Failure(errors.Unavailable, None, "droid stopped during the turn.", retry_after=1),
    "cancelled": Failure(errors.UpstreamError, None, "droid cancelled the turn."),
    "completion_persistence_failed": Failure(
        errors.InternalError, None, "droid could not save the turn to its session."),
    "no_approver_available": Failure(
        errors.InternalError, None, "droid had nobody to approve a tool the turn needed."),
    "error": Failure(errors.UpstreamError, None, "droid's turn failed."),
}

_QUOTA_WORDS = re.compile(r"quota (?:is )?exhausted|insufficient[_ ]quota|exceeded your current quota", re.I)
_CONTEXT_WORDS = re.compile(r"context (?:length|window)|too many tokens|maximum context|prompt is too long", re.I)
_FILTER_WORDS = re.compile(r"safety checks|content (?:filter|policy|moderation)", re.I)
_unknown_seen: set[str] = set()


def failure_for(reason: str, problems: Sequence[str]) -> errors.DroidpoolError | None:
    """The error for a turn droid ended with ``reason`` (None if it succeeded); ``problems`` are
    droid's own words about it, passed on to the client."""
    if reason in SUCCESS_REASONS:
        return None
    detail = "; ".join(problems)
    entry = TABLE.get(reason)
    if entry is None:
        if reason not in _unknown_seen:
            _unknown_seen.add(reason)
            log.warning("turn.unknown_failure_reason", reason=reason)
        return errors.UpstreamError(detail or f"droid ended the turn: {reason}", code=f"droid_{reason}")
    error, code, retry = entry.error, entry.code or f"droid_{reason}", entry.retry_after
    if reason == "model_rate_limited" and _QUOTA_WORDS.search(detail):
        error, code, retry = errors.QuotaExceeded, "insufficient_quota", None
    elif reason == "model_request_rejected" and _CONTEXT_WORDS.search(detail):
        code = "context_length_exceeded"
    elif reason == "model_request_rejected" and _FILTER_WORDS.search(detail):
        code = "content_filter"
    message = f"{entry.message} droid said: {detail}" if detail else entry.message
    return error(message, code=code, retry_after=retry)
