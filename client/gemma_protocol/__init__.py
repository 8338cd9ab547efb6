"""The tensor I/O contract between Triton clients and the Gemma model: one table, no dependencies.

The server side (the Triton model's `auto_complete_config`, serving/requests.py's parser) and the
client library (gemma_client) both import this package, so a name or type is written exactly once.
It ships in the gemma-client distribution (client/pyproject.toml), which the server images install
too; it needs nothing beyond the standard library, so the client image (no torch) has it.

The interface is Triton's vLLM backend's (triton-inference-server/vllm_backend), so its clients work
unchanged, with TensorRT-LLM's ensemble scalar tensors beside it (docs/vllm-backend.md maps both):
- sampling parameters arrive as one JSON object in `sampling_parameters`, or, without that tensor, as
  the request's own parameters; values may be strings ("0.1", "100"), converted as the vLLM backend
  converts them. Scalar tensors in the TensorRT-LLM ensemble's types (`max_tokens` INT32, `temperature`
  FP32, ...) win over either.
- `text_output` is always sent; every other output only when its BOOL `return_*` input asks for it.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional


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
    """One sampling parameter: its JSON key (vLLM's name), Python type, default and optional scalar
    tensor (TensorRT-LLM's name and type)."""
    key: str
    kind: type  # int, float, bool, str (list fields use `kind` for the element type)
    default: Any
    doc: str
    is_list: bool = False
    nullable: bool = False
    tensor: Optional[TensorSpec] = None


def _scalar(name: str, triton_type: str) -> TensorSpec:
    return TensorSpec(name, triton_type, (1,))


# Scalar tensors have the TensorRT-LLM ensemble's types (its config.pbtxt), which its clients and
# genai-perf's `tensorrtllm` payload send. Triton's HTTP generate endpoint converts a JSON number into
# the input's type itself, and wraps one too large for INT32 (max_tokens 4294967299 arrives as 3):
# that conversion happens before the model sees the request (docs/vllm-backend.md).
SAMPLING_FIELDS: tuple[SamplingField, ...] = (
    SamplingField("max_tokens", int, 16, "most tokens to generate (>= 1; vLLM's default, 16); null: as many "
                  "as the context leaves room for", nullable=True, tensor=_scalar("max_tokens", "TYPE_INT32")),
    SamplingField("min_tokens", int, 0, "stop strings, stop ids and EOS are ignored before this many tokens",
                  tensor=_scalar("min_tokens", "TYPE_INT32")),
    SamplingField("temperature", float, 1.0, "in [0, 100]; below 1e-5 greedy, otherwise logits are divided by it",
                  tensor=_scalar("temperature", "TYPE_FP32")),
    SamplingField("top_k", int, 0, "keep the k most likely tokens; 0 or -1 keeps all",
                  tensor=_scalar("top_k", "TYPE_INT32")),
    SamplingField("top_p", float, 1.0, "nucleus sampling mass in (0, 1]",
                  tensor=_scalar("top_p", "TYPE_FP32")),
    SamplingField("repetition_penalty", float, 1.0,
                  "in [0.01, 100]; > 1 discourages tokens already in prompt or output",
                  tensor=_scalar("repetition_penalty", "TYPE_FP32")),
    SamplingField("presence_penalty", float, 0.0,
                  "in [-2, 2]; subtracted once from the logit of every token already generated (OpenAI's)",
                  tensor=_scalar("presence_penalty", "TYPE_FP32")),
    SamplingField("frequency_penalty", float, 0.0,
                  "in [-2, 2]; subtracted from a token's logit once per time it was generated (OpenAI's)",
                  tensor=_scalar("frequency_penalty", "TYPE_FP32")),
    SamplingField("seed", int, None, "per-request RNG seed: same seed, same output, whatever the batch",
                  nullable=True, tensor=_scalar("seed", "TYPE_UINT64")),
    SamplingField("stop", str, (), "strings that end generation (not included in the output); one string or a list",
                  is_list=True, tensor=TensorSpec("stop_words", "TYPE_STRING", (-1,))),
    SamplingField("stop_token_ids", int, (), "token ids that end generation", is_list=True),
    SamplingField("ignore_eos", bool, False, "keep generating past EOS until max_tokens or a stop"),
    SamplingField("logprobs", int, None,
                  "in [0, 20]: each generated token's logprob, rank and this many most likely alternatives "
                  "(the `logprobs` output, with return_logprobs), from the model's raw distribution (before "
                  "temperature, top-k/p and penalties); absent: none",
                  nullable=True),
    SamplingField("bad_words", str, (), "words never generated (each as its tokens, with and without a leading space)",
                  is_list=True, tensor=TensorSpec("bad_words", "TYPE_STRING", (-1,))),
    SamplingField("n", int, 1, "completions of the prompt, sampled independently: one text_output element each",
                  tensor=_scalar("num_return_sequences", "TYPE_INT32")),
    SamplingField("structured_outputs", dict, None,
                  "vLLM's object constraining the output to exactly one of: `json` (a JSON schema), `regex`, "
                  "`choice` (a list of strings), `grammar` (Lark, or GBNF with ::=), `json_object: true`; with "
                  "optional `disable_any_whitespace` and `disable_additional_properties` (docs/structured-outputs.md). "
                  "A JSON string of the object is read too (request parameters hold no objects)",
                  nullable=True),
    SamplingField("speculate", bool, True,
                  "false: this request does not take part in the server's speculative decoding (if it has any); "
                  "the tokens are the same either way"),
)
# Older names of sampling keys that clients still send (vLLM before 0.11 called it guided_decoding).
KEY_ALIASES = {"guided_decoding": "structured_outputs"}
# Keys the serving layer handles itself (the engine generates one sequence per request).
SERVING_KEYS = ("n",)

# vLLM SamplingParams keys this model does not implement. Each is accepted at the value that changes
# nothing (vLLM's default) and refused otherwise, so no key that would change the output is dropped.
UNIMPLEMENTED_AT_DEFAULT: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "min_p": (0, 0.0),
    "prompt_logprobs": (None,),
    "detokenize": (True,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "include_stop_str_in_output": (False,),
    "truncate_prompt_tokens": (None,),
    "logit_bias": (None, {}),
    "allowed_token_ids": (None,),
    "logits_processors": (None,),
    "extra_args": (None,),
    "lora_name": (None,),
    "flat_logprobs": (False,),
}

TEXT_INPUT = TensorSpec("text_input", "TYPE_STRING", (1,), optional=False, doc="the prompt")
STREAM = TensorSpec("stream", "TYPE_BOOL", (1,), doc="true: one response per text delta; false (default): one response")
SAMPLING_PARAMETERS = TensorSpec("sampling_parameters", "TYPE_STRING", (1,),
                                 doc="JSON object with any of the sampling keys; values may be strings")
EXCLUDE_INPUT_IN_OUTPUT = TensorSpec(
    "exclude_input_in_output", "TYPE_BOOL", (1,),
    doc="false (the default without streaming): the response starts with the prompt; a stream never "
        "echoes it, and asking a stream for it (false with stream=true) is an error, as in the vLLM backend")


@dataclass(frozen=True)
class ReturnFlag:
    """A BOOL input asking for optional outputs; without it (or false) they are not sent."""
    name: str
    outputs: tuple[str, ...]
    origin: str  # "vllm": the vLLM backend's; "trtllm": the TensorRT-LLM ensemble's; "gemma": ours


RETURN_FLAGS: tuple[ReturnFlag, ...] = (
    ReturnFlag("return_finish_reason", ("finish_reason",), "vllm"),
    ReturnFlag("return_cumulative_logprob", ("cumulative_logprob",), "vllm"),
    ReturnFlag("return_logprobs", ("logprobs",), "vllm"),
    ReturnFlag("return_num_input_tokens", ("num_input_tokens",), "vllm"),
    ReturnFlag("return_num_output_tokens", ("num_output_tokens",), "vllm"),
    ReturnFlag("return_log_probs", ("cum_log_probs", "output_log_probs"), "trtllm"),
    ReturnFlag("return_output_ids", ("output_ids",), "gemma"),
    ReturnFlag("return_num_cached_tokens", ("num_cached_tokens",), "gemma"),
)
FLAGS_BY_NAME = {flag.name: flag for flag in RETURN_FLAGS}

# Older names of sampling tensors that clients still send: genai-perf's `tensorrtllm` payload asks for
# exactly `--output-tokens-mean` tokens with `min_length` (the ensemble's name before `min_tokens`).
TENSOR_ALIASES = {_scalar("min_length", "TYPE_INT32"): "min_tokens"}

# TensorRT-LLM ensemble inputs with no sampling key: accepted where the value changes nothing here.
# (beam_width > 1 and the logits outputs are features this model does not have; pad_id only pads
# TensorRT-LLM's own id outputs; length_penalty only weighs beams.)
BEAM_WIDTH = _scalar("beam_width", "TYPE_INT32")
END_ID = _scalar("end_id", "TYPE_INT32")  # an extra stop token id
IGNORED_TENSORS = (_scalar("pad_id", "TYPE_INT32"), _scalar("length_penalty", "TYPE_FP32"))
FALSE_ONLY_FLAGS = tuple(_scalar(name, "TYPE_BOOL")
                         for name in ("return_context_logits", "return_generation_logits", "return_perf_metrics"))

INPUTS: tuple[TensorSpec, ...] = (
    (TEXT_INPUT, STREAM, SAMPLING_PARAMETERS, EXCLUDE_INPUT_IN_OUTPUT)
    + tuple(_scalar(flag.name, "TYPE_BOOL") for flag in RETURN_FLAGS)
    + tuple(f.tensor for f in SAMPLING_FIELDS if f.tensor is not None) + tuple(TENSOR_ALIASES)
    + (BEAM_WIDTH, END_ID) + IGNORED_TENSORS + FALSE_ONLY_FLAGS
)

# One element per choice (n) where dims start with -1. Values on a streamed response cover the tokens
# since the previous response, as the vLLM backend sends them (num_output_tokens too).
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", (-1,), doc="text delta (streaming) or whole completion, per choice"),
    TensorSpec("finish_reason", "TYPE_STRING", (-1,),
               doc="'stop' or 'length' once a choice has finished, 'None' before (vLLM's str(None))"),
    TensorSpec("cumulative_logprob", "TYPE_FP32", (-1,), doc="sum of the generated tokens' logprobs so far"),
    TensorSpec("logprobs", "TYPE_STRING", (-1,),
               doc="JSON per choice: a list, one entry per new token, {token_id: {logprob, rank, decoded_token}}"
                   " (the sampled token first, then the top `logprobs` alternatives); 'null' without the "
                   "`logprobs` sampling parameter"),
    TensorSpec("num_input_tokens", "TYPE_UINT32", (1,), doc="prompt length in tokens"),
    TensorSpec("num_output_tokens", "TYPE_UINT32", (-1,), doc="tokens generated since the previous response"),
    TensorSpec("cum_log_probs", "TYPE_FP32", (-1,), doc="TensorRT-LLM's name for cumulative_logprob"),
    TensorSpec("output_log_probs", "TYPE_FP32", (-1, -1), doc="[choices, new tokens]: each new token's logprob"),
    TensorSpec("output_ids", "TYPE_INT32", (-1,), doc="token ids generated since the previous response (n = 1)"),
    TensorSpec("num_cached_tokens", "TYPE_UINT32", (1,), doc="prompt tokens whose K/V came from the prefix cache"),
)

FIELDS_BY_KEY = {f.key: f for f in SAMPLING_FIELDS}
FIELDS_BY_TENSOR = {f.tensor.name: f for f in SAMPLING_FIELDS if f.tensor is not None} | \
    {alias.name: FIELDS_BY_KEY[key] for alias, key in TENSOR_ALIASES.items()}
INPUT_NAMES = frozenset(spec.name for spec in INPUTS)


class ProtocolError(ValueError):
    """A request that does not fit the contract; the message names the offending field."""


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def check_value(field: SamplingField, value: Any) -> Any:
    """One sampling value converted to its field's type (ranges are the engine's business).

    Strings convert as the vLLM backend converts them ("0.1" -> 0.1, "100" -> 100), with two deliberate
    differences: "false" is False (Python's bool("false") is True), and an integer field takes an
    integral float (100.0) but refuses 100.5 rather than truncating it."""
    if value is None and field.nullable:
        return None
    if field.is_list:
        if isinstance(value, str) and field.kind is str:  # vLLM: stop="x" is stop=["x"]
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"'{field.key}' must be a list of {field.kind.__name__}")
        return tuple(_check_scalar(field, v) for v in value)
    return _check_scalar(field, value)


def _check_scalar(field: SamplingField, value: Any) -> Any:
    kind, key = field.kind, field.key
    if kind is dict:  # an object, or its JSON text (Triton's request parameters are flat)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ProtocolError(f"'{key}' must be an object or its JSON text, got {value[:80]!r}") from None
        if isinstance(value, dict):
            return value
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif not isinstance(value, bool):  # JSON true must not pass as max_tokens=1
        if isinstance(value, str):
            value = _number(value, key)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if kind is float and isinstance(value, int):
            try:
                return float(value)
            except OverflowError:  # a JSON integer of 400 digits
                raise ProtocolError(f"'{key}' is out of range, got an integer of {len(str(value))} digits") from None
        if isinstance(value, kind):
            return value
    raise ProtocolError(f"'{key}' must be {_KIND_NAMES[kind]}, got {value!r}")


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}
_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def _number(text: str, key: str) -> int | float:
    if not _NUMBER.fullmatch(text) or len(text) > 64:
        raise ProtocolError(f"'{key}' must be a number, got {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"'{key}' is out of range, got {text!r}")
    stripped = text.strip()
    return int(stripped) if stripped.lstrip("+-").isdigit() else value


def check_sampling(obj: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Sampling keys -> checked values. Unknown keys are refused; vLLM keys this model does not
    implement are accepted only at their default value (and then dropped). `source` names where the
    keys came from, for messages."""
    checked = {}
    for key, value in obj.items():
        key = KEY_ALIASES.get(key, key)
        field = FIELDS_BY_KEY.get(key)
        if field is not None:
            checked[key] = check_value(field, value)
        elif key in UNIMPLEMENTED_AT_DEFAULT:
            _check_at_default(key, value)
        else:
            match = difflib.get_close_matches(key, list(FIELDS_BY_KEY) + list(UNIMPLEMENTED_AT_DEFAULT), 1)
            hint = f" (did you mean {match[0]!r}?)" if match else ""
            raise ProtocolError(f"unknown sampling parameter {key!r}{hint} in {source}; known: {sorted(FIELDS_BY_KEY)}")
    return checked


def _check_at_default(key: str, value: Any) -> None:
    defaults = UNIMPLEMENTED_AT_DEFAULT[key]
    if isinstance(value, str) and not any(isinstance(d, str) for d in defaults):
        lowered = value.strip().lower()  # "true", "0.0", "null" as strings
        value = {"true": True, "false": False, "null": None, "none": None}.get(lowered, value)
        if isinstance(value, str):
            try:
                value = float(lowered)
            except ValueError:
                pass
    if not any(value is d or (bool not in (type(value), type(d)) and value == d) for d in defaults):
        shown = " or ".join(json.dumps(d) for d in defaults)
        raise ProtocolError(f"sampling parameter {key!r} is not supported by this model (only its default, "
                            f"{shown}, is accepted); got {value!r}")


# What `sampling_parameters` may be, checked before it is parsed: the parser recurses once per level
# of nesting (RecursionError at ~1,000); the deepest legitimate object is a JSON schema of nested
# objects inside `structured_outputs` (each level of the schema nests two: properties, then the property).
MAX_SAMPLING_JSON_BYTES = 64 << 10
MAX_SAMPLING_JSON_DEPTH = 40
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not count)."""
    depth = deepest = 0
    for bracket in _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def load_json_object(text: str, name: str) -> dict[str, Any]:
    """A bounded JSON object (`sampling_parameters`, or the request's parameters); errors name `name`."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SAMPLING_JSON_BYTES:
        raise ProtocolError(f"'{name}' is {size} bytes; the limit is {MAX_SAMPLING_JSON_BYTES}")
    if json_depth(text) > MAX_SAMPLING_JSON_DEPTH:
        raise ProtocolError(f"'{name}' nests more than {MAX_SAMPLING_JSON_DEPTH} levels deep")
    try:
        obj = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise ProtocolError(f"'{name}' is not valid JSON: {e.msg}") from None
    except ValueError:  # an integer too long to convert (Python's limit: 4,300 digits)
        raise ProtocolError(f"'{name}' holds a number too long to read") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"'{name}' must be a JSON object")
    return obj


def parse_sampling_json(text: str) -> dict[str, Any]:
    """The `sampling_parameters` tensor's JSON -> checked values."""
    return check_sampling(load_json_object(text, "sampling_parameters"), "'sampling_parameters'")


def parse_request_parameters(text: str) -> dict[str, Any]:
    """The request's own parameters (Triton's JSON of them) read as sampling keys, as the vLLM backend
    reads them when no `sampling_parameters` tensor is sent. A parameter named like an input
    (`"parameters": {"stream": false}` in the vLLM backend's README) is not a sampling key: ignored."""
    params = load_json_object(text, "parameters")
    return check_sampling({k: v for k, v in params.items() if k in FIELDS_BY_KEY or k not in INPUT_NAMES},
                          "the request parameters")


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
