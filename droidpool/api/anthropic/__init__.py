"""Anthropic Messages: requests read into the neutral core (``request``), message events and bodies
and Anthropic's error envelope (``response``)."""

from __future__ import annotations

from ..dialect import Dialect
from .request import (
           THINKING_ABOVE,
           THINKING_EFFORTS,
           count_tokens,
           models_page,
           parse,
           thinking_effort,
)
from .response import MessagesEncoder, error_body, signature, stop_reason, usage_body

__all__ = ["DIALECT", "THINKING_ABOVE", "THINKING_EFFORTS", "MessagesEncoder", "count_tokens", "error_body",
           "models_page", "parse", "signature", "stop_reason", "thinking_effort", "usage_body"]

DIALECT = Dialect("anthropic", parse, MessagesEncoder, error_body)
