"""Request tensors out, `Delta`s in: the part of the client that knows the I/O contract.

Every tensor name and type comes from `protocol.INPUTS` / `protocol.OUTPUTS`; a name that is not in
those tables fails at import, not on the wire. Shared by the sync and asyncio clients.
"""
from __future__ import annotations

import codecs
import json
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

# Triton's response parameter marking the last response of a decoupled request.
FINAL_RESPONSE_PARAM = "triton_final_response"
# Asks Triton (>= 24.09) to end a failed stream with the error's gRPC status instead of an in-band,
# code-less message. Opt-in only: Triton 2.51 segfaults when several such streams fail at once.
GRPC_ERROR_HEADER = "triton_grpc_error"


def check_sampling(sampling: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
    """Validate sampling kwargs against `protocol.SAMPLING_FIELDS`; return the JSON-ready dict.

    None values are dropped (the server default applies). Known keys are always type-checked;
    unknown keys are an `InvalidArgumentError` unless `strict` is False, when they are passed through
    untouched (other backends, e.g. vLLM's, accept more keys).
    """
    checked: dict[str, Any] = {}
    for key, value in sampling.items():
        if value is None:
            continue
        field = protocol.FIELDS_BY_KEY.get(key)
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
    return checked


def _tensor(spec: protocol.TensorSpec, value: Any) -> InferInput:
    array = np.array([value], dtype=triton_to_np_dtype(spec.datatype))
    tensor = InferInput(spec.name, list(array.shape), spec.datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def build_inputs(prompt: str, sampling: Mapping[str, Any], stream: bool) -> list[InferInput]:
    """The request tensors: prompt, stream flag, no prompt echo, sampling as one JSON object."""
    if not isinstance(prompt, str):
        raise InvalidArgumentError(f"prompt must be str, got {type(prompt).__name__}")
    return [
        _tensor(TEXT_INPUT, prompt.encode("utf-8")),
        _tensor(STREAM, stream),
        _tensor(EXCLUDE_INPUT, True),
        _tensor(SAMPLING_PARAMETERS, json.dumps(dict(sampling)).encode("utf-8")),
    ]


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
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, result: InferResult) -> tuple[Optional[Delta], bool]:
        """Return (delta or None for an empty response, whether this is the request's last)."""
        params = result.get_response().parameters
        final = FINAL_RESPONSE_PARAM in params and params[FINAL_RESPONSE_PARAM].bool_param

        text_parts = _optional(result, TEXT_OUTPUT)
        data = b"".join(_as_bytes(t) for t in text_parts.flat) if text_parts is not None else b""
        text = self._utf8.decode(data, final=final)

        reason_array = _optional(result, FINISH_REASON)
        finish_reason = _as_bytes(reason_array.flat[0]).decode("utf-8") if reason_array is not None else ""
        ids = _optional(result, OUTPUT_IDS)
        token_ids = tuple(int(i) for i in ids.flat) if ids is not None else ()
        n_in = _optional(result, NUM_INPUT_TOKENS)
        n_out = _optional(result, NUM_OUTPUT_TOKENS)
        logprobs_json = _optional(result, LOGPROBS)
        logprobs = _parse_logprobs(_as_bytes(logprobs_json.flat[0])) if logprobs_json is not None else None

        if not (text or token_ids or finish_reason or n_in is not None or n_out is not None):
            return None, final
        return Delta(
            text=text,
            token_ids=token_ids,
            finish_reason=finish_reason or None,
            num_input_tokens=int(n_in.flat[-1]) if n_in is not None else None,
            num_output_tokens=int(n_out.flat[-1]) if n_out is not None else None,
            logprobs=logprobs,
        ), final

    def flush(self) -> str:
        """Whatever partial character is left when a stream ends without a final flag."""
        return self._utf8.decode(b"", final=True)


def _parse_logprobs(data: bytes) -> tuple[TokenLogprobs, ...]:
    """The `logprobs` output's JSON (see gemma_protocol.OUTPUTS)."""
    return tuple(TokenLogprobs(e["token_id"], e["token"], e["logprob"],
                               tuple(Logprob(t["token_id"], t["token"], t["logprob"]) for t in e["top_logprobs"]))
                 for e in json.loads(data))


def _as_bytes(item: Any) -> bytes:
    return item if isinstance(item, bytes) else str(item).encode("utf-8")
