"""Request tensors out, `Delta`s in: the part of the client that knows the I/O contract.

Every tensor name and type comes from `protocol.INPUTS` / `protocol.OUTPUTS`; a name that is not in
those tables fails at import, not on the wire. Shared by the sync and asyncio clients.
"""
from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import gemma_protocol as protocol
import numpy as np
from tritonclient.grpc import InferInput, InferResult
from tritonclient.utils import triton_to_np_dtype

from .errors import InvalidArgumentError
from .outputs import Delta, Logprob, TokenLogprobs


def _spec(table: tuple[protocol.TensorSpec, ...], name: str) -> protocol.TensorSpec:
    for spec in table:
        if spec.name == name:
            return spec
    raise ImportError(f"tensor {name!r} is not in the protocol table")


TEXT_INPUT = _spec(protocol.INPUTS, "text_input")
STREAM = _spec(protocol.INPUTS, "stream")
SAMPLING_PARAMETERS = _spec(protocol.INPUTS, "sampling_parameters")
EXCLUDE_INPUT = _spec(protocol.INPUTS, "exclude_input_in_output")

TEXT_OUTPUT = _spec(protocol.OUTPUTS, "text_output")
FINISH_REASON = _spec(protocol.OUTPUTS, "finish_reason")
NUM_INPUT_TOKENS = _spec(protocol.OUTPUTS, "num_input_tokens")
NUM_OUTPUT_TOKENS = _spec(protocol.OUTPUTS, "num_output_tokens")
OUTPUT_IDS = _spec(protocol.OUTPUTS, "output_ids")
LOGPROBS = _spec(protocol.OUTPUTS, "logprobs")
NUM_CACHED_TOKENS = _spec(protocol.OUTPUTS, "num_cached_tokens")

# The server sends an optional output only when its BOOL `return_*` input asks. These are a few
# numbers per response, so every request asks; `logprobs` (a JSON list per response) only when the
# sampling parameters ask for logprobs, and `num_cached_tokens` when the client was made to (each
# tensor costs the server's responder time on every response).
ALWAYS_RETURNED = tuple(_spec(protocol.INPUTS, name) for name in (
    "return_finish_reason", "return_num_input_tokens", "return_num_output_tokens", "return_output_ids"))
RETURN_LOGPROBS = _spec(protocol.INPUTS, "return_logprobs")
RETURN_NUM_CACHED_TOKENS = _spec(protocol.INPUTS, "return_num_cached_tokens")
# `finish_reason` before a choice has ended: vLLM's str(None) ("" from servers before the vLLM layout).
NOT_FINISHED = ("None", "")

# Triton's response parameter marking the last response of a decoupled request.
FINAL_RESPONSE_PARAM = "triton_final_response"
# Asks Triton (>= 24.09) to end a failed stream with the error's gRPC status instead of an in-band,
# code-less message. Opt-in only: Triton 2.51 segfaults when several such streams fail at once.
GRPC_ERROR_HEADER = "triton_grpc_error"


def check_sampling(sampling: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
    """Validate sampling kwargs against `protocol.SAMPLING_FIELDS`; return the JSON-ready dict.

    None values are dropped (the server default applies), except where None means something of its
    own: `max_tokens=None` asks for as many tokens as the context leaves room for (vLLM's None), so
    it is sent as null. Known keys are always type-checked; unknown keys are an
    `InvalidArgumentError` unless `strict` is False, when they are passed through untouched (other
    backends, e.g. vLLM's, accept more keys).
    """
    checked: dict[str, Any] = {}
    for key, value in sampling.items():
        field = protocol.FIELDS_BY_KEY.get(key)
        if value is None:
            if field is not None and field.nullable and field.default is not None:
                checked[key] = None
            continue
        if field is None:
            if strict:
                raise InvalidArgumentError(
                    f"unknown sampling parameter {key!r}; known: {sorted(protocol.FIELDS_BY_KEY)}")
            checked[key] = value
            continue
        try:
            value = protocol.check_value(field, value)
        except protocol.ProtocolError as e:
            raise InvalidArgumentError(str(e)) from None
        checked[key] = list(value) if field.is_list else value
    if isinstance(checked.get(STRUCTURED_OUTPUTS), Mapping):
        checked[STRUCTURED_OUTPUTS] = schema_as_text(checked[STRUCTURED_OUTPUTS])
    return checked


STRUCTURED_OUTPUTS = "structured_outputs"


def schema_as_text(structured_outputs: Mapping[str, Any]) -> dict[str, Any]:
    """`structured_outputs` with a `json` schema object sent as JSON text (the server reads both):
    `sampling_parameters` may nest only `protocol.MAX_SAMPLING_JSON_DEPTH` levels deep, and a schema
    of nested objects inside it is deeper; text does not count."""
    schema = structured_outputs.get("json")
    if isinstance(schema, (dict, list)):
        try:
            return {**structured_outputs, "json": json.dumps(schema)}
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"'structured_outputs.json' is not JSON: {e}") from None
    return dict(structured_outputs)


def _tensor(spec: protocol.TensorSpec, value: Any) -> InferInput:
    array = np.array([value], dtype=triton_to_np_dtype(spec.datatype))
    tensor = InferInput(spec.name, list(array.shape), spec.datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def build_inputs(prompt: str, sampling: Mapping[str, Any], stream: bool,
                 cached_tokens: bool = False) -> list[InferInput]:
    """The request tensors: prompt, stream flag, no prompt echo, sampling as one JSON object, and
    the `return_*` flags of the outputs the client reads."""
    if not isinstance(prompt, str):
        raise InvalidArgumentError(f"prompt must be str, got {type(prompt).__name__}")
    flags = ALWAYS_RETURNED + ((RETURN_LOGPROBS,) if sampling.get("logprobs") is not None else ()) \
        + ((RETURN_NUM_CACHED_TOKENS,) if cached_tokens else ())
    return [
        _tensor(TEXT_INPUT, prompt.encode("utf-8")),
        _tensor(STREAM, stream),
        _tensor(EXCLUDE_INPUT, True),
        _tensor(SAMPLING_PARAMETERS, json.dumps(dict(sampling)).encode("utf-8")),
        *(_tensor(flag, True) for flag in flags),
    ]


@dataclass(frozen=True)
class Request:
    """One call's request tensors, and what reading its responses takes."""
    inputs: list[InferInput]
    num_top_logprobs: Optional[int]  # the `logprobs` sampling value; None: no logprobs asked for

    def decoder(self) -> ResponseDecoder:
        return ResponseDecoder(self.num_top_logprobs)


def build_request(prompt: str, sampling: Mapping[str, Any], stream: bool, cached_tokens: bool = False) -> Request:
    return Request(build_inputs(prompt, sampling, stream, cached_tokens), sampling.get("logprobs"))


def merge_headers(*dicts: Optional[Mapping[str, str]], grpc_error_status: bool = False) -> dict[str, str]:
    headers: dict[str, str] = {GRPC_ERROR_HEADER: "true"} if grpc_error_status else {}
    for d in dicts:
        headers.update(d or {})
    return headers


def _optional(result: InferResult, spec: protocol.TensorSpec) -> Optional[np.ndarray]:
    array = result.as_numpy(spec.name)
    return None if array is None or array.size == 0 else array


class ResponseDecoder:
    """Turns one request's `InferResult`s into `Delta`s.

    Text arrives as UTF-8 bytes; an incremental decoder keeps a character split across two
    responses (possible with other backends) intact, so streamed text equals generated text.
    `num_top_logprobs` is the request's `logprobs` sampling value: how many alternatives each
    token's logprobs list; None (no logprobs asked for) leaves `Delta.logprobs` None, whatever the
    server sends. Any optional output may be missing, or sent unasked.
    """

    def __init__(self, num_top_logprobs: Optional[int] = None) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._num_top_logprobs = num_top_logprobs

    def decode(self, result: InferResult) -> tuple[Optional[Delta], bool]:
        """Return (delta or None for an empty response, whether this is the request's last)."""
        params = result.get_response().parameters
        final = FINAL_RESPONSE_PARAM in params and params[FINAL_RESPONSE_PARAM].bool_param

        text_parts = _optional(result, TEXT_OUTPUT)
        data = b"".join(_as_bytes(t) for t in text_parts.flat) if text_parts is not None else b""
        text = self._utf8.decode(data, final=final)

        reason = _first_text(result, FINISH_REASON)
        finish_reason = None if reason is None or reason in NOT_FINISHED else reason
        ids = _optional(result, OUTPUT_IDS)
        token_ids = tuple(int(i) for i in ids.flat) if ids is not None else ()
        n_in, n_out = _first_int(result, NUM_INPUT_TOKENS), _first_int(result, NUM_OUTPUT_TOKENS)
        logprobs_json = _first_text(result, LOGPROBS) if self._num_top_logprobs is not None else None
        logprobs = parse_logprobs(logprobs_json, self._num_top_logprobs) if logprobs_json is not None else None

        if not (text or token_ids or finish_reason or n_in is not None or n_out is not None):
            return None, final
        return Delta(
            text=text,
            token_ids=token_ids,
            finish_reason=finish_reason,
            num_input_tokens=n_in,
            num_output_tokens=n_out,
            logprobs=logprobs,
            num_cached_tokens=_first_int(result, NUM_CACHED_TOKENS),
        ), final

    def flush(self) -> str:
        """Whatever partial character is left when a stream ends without a final flag."""
        return self._utf8.decode(b"", final=True)


def _first_text(result: InferResult, spec: protocol.TensorSpec) -> Optional[str]:
    """Choice 0's element of a per-choice string output (the client sends n = 1)."""
    array = _optional(result, spec)
    return None if array is None else _as_bytes(array.flat[0]).decode("utf-8")


def _first_int(result: InferResult, spec: protocol.TensorSpec) -> Optional[int]:
    array = _optional(result, spec)
    return None if array is None else int(array.flat[0])


def parse_logprobs(text: str, num_top_logprobs: int) -> Optional[tuple[TokenLogprobs, ...]]:
    """The `logprobs` output's JSON, the vLLM backend's layout: per token, a map from token id to
    {"logprob", "rank", "decoded_token"}, the sampled token first, then the `num_top_logprobs` most
    likely tokens (the sampled one once, if it is among them). "null": the request asked for none.

    Which entries are the top ones is read from the ranks: an entry listed only as the sampled token
    ranks below them. The count is needed too - with k = 1 a sampled token of rank 2 and its better
    rival read exactly as k = 2 with the sampled token second."""
    positions = json.loads(text)
    if positions is None:
        return None
    return tuple(_token_logprobs(position, num_top_logprobs) for position in positions)


def _token_logprobs(position: Mapping[str, Mapping[str, Any]], num_top_logprobs: int) -> TokenLogprobs:
    sampled_id, sampled = next(iter(position.items()))
    by_rank = sorted(position.items(), key=lambda item: item[1]["rank"])
    top = tuple(_logprob(token_id, entry) for token_id, entry in by_rank
                if entry["rank"] <= num_top_logprobs)[:num_top_logprobs]  # a tie can rank k + 1 within k
    head = _logprob(sampled_id, sampled)
    return TokenLogprobs(head.token_id, head.token, head.logprob, top, sampled["rank"])


def _logprob(token_id: str, entry: Mapping[str, Any]) -> Logprob:
    # vLLM sends a null decoded_token when it does not detokenize.
    return Logprob(int(token_id), entry["decoded_token"] or "", entry["logprob"])


def _as_bytes(item: Any) -> bytes:
    return item if isinstance(item, bytes) else str(item).encode("utf-8")
