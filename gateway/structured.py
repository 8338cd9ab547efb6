"""`response_format` -> the engine's `structured_outputs` constraint (vLLM's names and shape).

    {"type": "text"}                      no constraint
    {"type": "json_object"}               {"json_object": true}: any JSON object
    {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}
                                          {"json": "<the schema as JSON text>"}; strict: true adds
                                          "disable_additional_properties" (objects hold only the
                                          properties their schema names, unless it says otherwise)

The schema travels as JSON text, not as an object (as gemma_client sends any schema): the server
bounds how deep `sampling_parameters` may nest (gemma_protocol.MAX_SAMPLING_JSON_DEPTH), and a
string does not count. The engine compiles it; an
invalid schema comes back as INVALID_ARGUMENT naming `structured_outputs.json`, which errors.py turns
into a 400 naming the request field that held it.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from .schemas import ResponseFormat

# JSON without whitespace between its tokens (vLLM's `disable_any_whitespace`), as OpenAI writes
# structured outputs and tool arguments. With whitespace allowed, a small model can spend its whole
# max_tokens on newlines and spaces inside an object (docs/gateway.md, Structured outputs).
COMPACT_JSON = True


def json_constraint(schema: Optional[dict[str, Any]], strict: bool = False) -> dict[str, Any]:
    """The constraint for a JSON schema (None: any JSON object)."""
    constraint: dict[str, Any] = {"json": json.dumps(schema)} if schema is not None else {"json_object": True}
    if COMPACT_JSON:
        constraint["disable_any_whitespace"] = True
    if strict and schema is not None:
        constraint["disable_additional_properties"] = True
    return constraint


def response_format_constraint(response_format: Optional[ResponseFormat]) -> Optional[dict[str, Any]]:
    """The `structured_outputs` a request's response_format asks for; None: unconstrained text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_constraint(None)
    spec = response_format.json_schema
    return json_constraint(spec.schema_, strict=bool(spec.strict))
