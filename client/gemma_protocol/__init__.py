"""The tensor I/O contract between Triton clients and the Gemma model: one table, no dependencies.

The server side (the Triton model's `auto_complete_config`, serving/requests.py's parser) and the
client library (gemma_client) both import this package, so a name or type is written exactly once.
It ships in the gemma-client distribution (client/pyproject.toml), which the server images install
too; it needs nothing beyond the standard library, so the client image (no torch) has it.

Sampling parameters arrive either as one JSON object in `sampling_parameters` (vLLM backend style)
or as scalar tensors (TensorRT-LLM style). When a field is given both ways, the scalar tensor wins.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class TensorSpec:
    name: str
    triton_type: str  # as written in config.pbtxt, e.g. "TYPE_STRING"
    dims: tuple[int, ...]
    optional: bool = True
    doc: str = ""

    @property
    def datatype(self) -> str:
        """The wire datatype tritonclient uses ("BYTES", "INT32", ...)."""
        t = self.triton_type.removeprefix("TYPE_")
        return "BYTES" if t == "STRING" else t


@dataclass(frozen=True)
class SamplingField:
    """One sampling parameter: its JSON key, Python type, default and optional scalar tensor."""
    key: str
    kind: type  # int, float, bool, str (list fields use `kind` for the element type)
    default: Any
    doc: str
    is_list: bool = False
    nullable: bool = False
    tensor: Optional[TensorSpec] = None


# Scalar inputs are 64-bit: Triton's HTTP generate endpoint converts a JSON number to the input's type,
# and into a 32-bit input it wrapped (max_tokens 4294967299 was served as 3).
SAMPLING_FIELDS: tuple[SamplingField, ...] = (
    SamplingField("max_tokens", int, 64, "most tokens to generate (>= 1)",
                  tensor=TensorSpec("max_tokens", "TYPE_INT64", (1,))),
    SamplingField("min_tokens", int, 0, "stop strings, stop ids and EOS are ignored before this many tokens",
                  tensor=TensorSpec("min_tokens", "TYPE_INT64", (1,))),
    SamplingField("temperature", float, 1.0, "in [0, 100]; below 1e-5 greedy, otherwise logits are divided by it",
                  tensor=TensorSpec("temperature", "TYPE_FP64", (1,))),
    SamplingField("top_k", int, 0, "keep the k most likely tokens; 0 keeps all",
                  tensor=TensorSpec("top_k", "TYPE_INT64", (1,))),
    SamplingField("top_p", float, 1.0, "nucleus sampling mass in (0, 1]",
                  tensor=TensorSpec("top_p", "TYPE_FP64", (1,))),
    SamplingField("repetition_penalty", float, 1.0,
                  "in [0.01, 100]; > 1 discourages tokens already in prompt or output",
                  tensor=TensorSpec("repetition_penalty", "TYPE_FP64", (1,))),
    SamplingField("presence_penalty", float, 0.0,
                  "in [-2, 2]; subtracted once from the logit of every token already generated (OpenAI's)",
                  tensor=TensorSpec("presence_penalty", "TYPE_FP64", (1,))),
    SamplingField("frequency_penalty", float, 0.0,
                  "in [-2, 2]; subtracted from a token's logit once per time it was generated (OpenAI's)",
                  tensor=TensorSpec("frequency_penalty", "TYPE_FP64", (1,))),
    SamplingField("seed", int, None, "per-request RNG seed: same seed, same output, whatever the batch",
                  nullable=True, tensor=TensorSpec("seed", "TYPE_UINT64", (1,))),
    SamplingField("stop", str, (), "strings that end generation (not included in the output)",
                  is_list=True, tensor=TensorSpec("stop_words", "TYPE_STRING", (-1,))),
    SamplingField("stop_token_ids", int, (), "token ids that end generation", is_list=True),
    SamplingField("ignore_eos", bool, False, "keep generating past EOS until max_tokens or a stop"),
    SamplingField("logprobs", int, None,
                  "in [0, 20]: return each generated token's logprob and this many most likely alternatives "
                  "(the `logprobs` output), from the model's raw distribution (before temperature, top-k/p "
                  "and penalties); absent: none",
                  nullable=True, tensor=TensorSpec("logprobs", "TYPE_INT64", (1,))),
)

INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", "TYPE_STRING", (1,), optional=False, doc="the prompt"),
    TensorSpec("stream", "TYPE_BOOL", (1,), doc="true: one response per text delta; false (default): one response"),
    TensorSpec("sampling_parameters", "TYPE_STRING", (1,), doc="JSON object with any of the sampling keys"),
    TensorSpec("exclude_input_in_output", "TYPE_BOOL", (1,),
               doc="false (default): a non-streaming response starts with the prompt; streams never echo it"),
) + tuple(f.tensor for f in SAMPLING_FIELDS if f.tensor is not None)

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", (-1,), doc="text delta (streaming) or whole completion"),
    TensorSpec("finish_reason", "TYPE_STRING", (-1,), doc="'stop', 'length' or 'cancelled' on the last response, else ''"),
    TensorSpec("num_input_tokens", "TYPE_UINT32", (1,), doc="prompt length in tokens"),
    TensorSpec("num_output_tokens", "TYPE_UINT32", (-1,), doc="tokens generated so far"),
    TensorSpec("output_ids", "TYPE_INT32", (-1,), doc="token ids generated since the previous response"),
    TensorSpec("logprobs", "TYPE_STRING", (1,),
               doc="only when the request set `logprobs`: a JSON list, one entry per id in output_ids, "
                   "{token_id, token, logprob, top_logprobs: [{token_id, token, logprob}, ...]}"),
)

FIELDS_BY_KEY = {f.key: f for f in SAMPLING_FIELDS}
FIELDS_BY_TENSOR = {f.tensor.name: f for f in SAMPLING_FIELDS if f.tensor is not None}


class ProtocolError(ValueError):
    """A request that does not fit the contract; the message names the offending field."""


def check_value(field: SamplingField, value: Any) -> Any:
    """Type-check one sampling value (ranges are the engine's business) and normalise it."""
    if value is None and field.nullable:
        return None
    if field.is_list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ProtocolError(f"'{field.key}' must be a list of {field.kind.__name__}")
        return tuple(_check_scalar(field, v) for v in value)
    return _check_scalar(field, value)


def _check_scalar(field: SamplingField, value: Any) -> Any:
    kind = field.kind
    # bool is an int in Python; JSON true must not pass as max_tokens=1.
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            ok, value = True, float(value)
        except OverflowError:  # a JSON integer of 400 digits
            raise ProtocolError(f"'{field.key}' is out of range, got an integer of {len(str(value))} digits") from None
    if not ok:
        raise ProtocolError(f"'{field.key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


# What `sampling_parameters` may be, checked before it is parsed: the parser recurses once per level
# of nesting (RecursionError at ~1,000), and the legitimate object nests two levels ({"stop": [...]}).
MAX_SAMPLING_JSON_BYTES = 64 << 10
MAX_SAMPLING_JSON_DEPTH = 8
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not count)."""
    depth = deepest = 0
    for bracket in _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_sampling_json(text: str) -> dict[str, Any]:
    """Parse the `sampling_parameters` JSON into checked values; unknown keys are errors."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SAMPLING_JSON_BYTES:
        raise ProtocolError(f"'sampling_parameters' is {size} bytes; the limit is {MAX_SAMPLING_JSON_BYTES}")
    if json_depth(text) > MAX_SAMPLING_JSON_DEPTH:
        raise ProtocolError(f"'sampling_parameters' nests more than {MAX_SAMPLING_JSON_DEPTH} levels deep")
    try:
        obj = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise ProtocolError(f"'sampling_parameters' is not valid JSON: {e.msg}") from None
    except ValueError:  # an integer too long to convert (Python's limit: 4,300 digits)
        raise ProtocolError("'sampling_parameters' holds a number too long to read") from None
    if not isinstance(obj, dict):
        raise ProtocolError("'sampling_parameters' must be a JSON object")
    unknown = sorted(set(obj) - set(FIELDS_BY_KEY))
    if unknown:
        raise ProtocolError(f"unknown sampling parameter(s) {unknown}; known: {sorted(FIELDS_BY_KEY)}")
    return {k: check_value(FIELDS_BY_KEY[k], v) for k, v in obj.items()}


# --- Errors inside a stream ------------------------------------------------------------------------
# Triton hands a failed stream request to the client as a bare message: no gRPC status. (The
# `triton_grpc_error` request header would end the stream with the real status, but the Triton 2.51
# that nvidia-pytriton bundles segfaults when several such streams fail at once.) So the model writes
# the status into the message - "[INVALID_ARGUMENT] 'top_p' must be in (0, 1]" - and clients read it
# back with `split_error_status`. Names are gRPC's (grpc.StatusCode), not TritonError's.
ERROR_STATUSES = ("INVALID_ARGUMENT", "UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "NOT_FOUND", "INTERNAL")


def tag_error(status: str, message: str) -> str:
    """The error message the model sends: `message` prefixed with its status name."""
    if status not in ERROR_STATUSES:
        raise ValueError(f"unknown error status {status!r}; known: {ERROR_STATUSES}")
    return f"[{status}] {message}"


def split_error_status(message: str) -> tuple[Optional[str], str]:
    """(status, message without the tag) of a tagged error message; (None, message) otherwise."""
    if message.startswith("["):
        status, sep, rest = message[1:].partition("] ")
        if sep and status in ERROR_STATUSES:
            return status, rest
    return None, message
