"""OpenAI Responses: input items read into the neutral core (``request``), response objects and
their event stream (``response``)."""

from __future__ import annotations

from ..dialect import Dialect
from .request import parse, turn_id_of
from .response import ResponsesEncoder, completed, error_body, stored, usage_body

__all__ = ["DIALECT", "ResponsesEncoder", "completed", "error_body", "parse", "stored", "turn_id_of", "usage_body"]

DIALECT = Dialect("responses", parse, ResponsesEncoder, error_body)
