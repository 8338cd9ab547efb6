"""`response_format` (and vLLM's `structured_outputs` extension) -> the engine's `structured_outputs`
constraint (vLLM's names and shape).

    {"type": "text"}                      no constraint
    {"type": "json_object"}               a JSON object
    {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}
                                          JSON that follows the schema; objects take only the
                                          properties they name, unless the schema says otherwise
                                          ("disable_additional_properties", as vLLM's default
                                          backend, xgrammar, behaves)

The gateway's JSON is laid out on one line with a space after each ':' and ',' (as Python's
json.dumps writes it). Measured with the packaged Gemma 3 270M, greedy, on a tool's arguments:
without any whitespace it closed every string at once ({"city":""}); with whitespace allowed
anywhere it wrote indented lines, and a tiny random model wrote tabs until max_tokens; one-line JSON
gave {"city": "Paris", "days": 3}. Closed objects: with additional properties allowed the 270M went
on adding keys ("type", "properties", ...) until max_tokens. The layout is set with llguidance's own
schema options (`x-guidance`, read by the library the engine compiles with, backend/grammar.py).

The schema travels as JSON text, not as an object (as gemma_client sends any schema): the server
bounds how deep `sampling_parameters` may nest (gemma_protocol.MAX_SAMPLING_JSON_DEPTH), and a
string does not count. The engine compiles it; an invalid schema comes back as INVALID_ARGUMENT
naming `structured_outputs.json`, which errors.py turns into a 400 naming the request field that
held it.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from .errors import invalid_request
from .schemas import ResponseFormat

JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
LAYOUT_KEY = "x-guidance"  # llguidance reads its compile options from the schema's top level


def json_constraint(schema: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The constraint for a JSON schema (None: any JSON object), laid out as JSON_LAYOUT."""
    if schema is None:
        return {"json": json.dumps({"type": "object", LAYOUT_KEY: JSON_LAYOUT})}
    laid_out = schema if LAYOUT_KEY in schema else {**schema, LAYOUT_KEY: JSON_LAYOUT}  # a schema's own wins
    return {"json": json.dumps(laid_out), "disable_additional_properties": True}


def response_format_constraint(response_format: Optional[ResponseFormat]) -> Optional[dict[str, Any]]:
    """The `structured_outputs` a request's response_format asks for; None: unconstrained text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_constraint(None)
    return json_constraint(response_format.json_schema.schema_)


def one_constraint(**asked: Optional[dict[str, Any]]) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(the constraint, the request field that asked for it) of the fields given (keyword: field name,
    value: its constraint or None); more than one is a 400 naming the first."""
    given = [(field, constraint) for field, constraint in asked.items() if constraint is not None]
    if len(given) > 1:
        raise invalid_request(f"'{given[0][0]}' and '{given[1][0]}' both constrain the output; give one of them",
                              param=given[0][0])
    return (given[0][1], given[0][0]) if given else (None, None)
