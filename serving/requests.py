"""One Triton request's input tensors -> what to generate and which outputs to send back.

Knows the tensor contract (gemma_protocol) and the engine's SamplingParams but not Triton: it takes
plain numpy arrays by tensor name (and the request's parameters as Triton's JSON text), so it is
tested without a server. Every rejection is a `ProtocolError` (a ValueError) whose message names the
offending field; the Triton model turns it into INVALID_ARG.

The rules are the vLLM backend's (docs/vllm-backend.md): sampling keys come from `sampling_parameters`,
or from the request's parameters when that tensor is absent; TensorRT-LLM-style scalar tensors win over
both; optional outputs are sent only when a `return_*` input asks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
from gemma_protocol import (BEAM_WIDTH, END_ID, EXCLUDE_INPUT_IN_OUTPUT, FALSE_ONLY_FLAGS, FIELDS_BY_TENSOR,
                            RETURN_FLAGS, SAMPLING_PARAMETERS, STREAM, TEXT_INPUT, ProtocolError,
                            check_value, parse_request_parameters, parse_sampling_json)

from backend.params import SamplingParams

DEFAULT_MAX_PROMPT_BYTES = 256 * 1024
MAX_CHOICES = 16  # n: each choice is a sequence in the engine; bounded like every other request size
# The vLLM backend's words for this refusal, which its clients compare verbatim.
STREAM_ECHO_ERROR = "Error generating stream: When streaming, `exclude_input_in_output` = False is not allowed."


class StreamEchoError(ProtocolError):
    """A stream asked to start with the prompt; sent with the vLLM backend's exact message."""


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    params: SamplingParams  # what the engine runs for each choice (see choice_params)
    n: int = 1
    stream: bool = False
    echo_prompt: bool = False  # the (non-streamed) text_output starts with the prompt
    outputs: frozenset[str] = frozenset()  # optional outputs asked for by name (gemma_protocol.OUTPUTS)
    logprobs: Optional[int] = None  # the client's `logprobs` key: None sends 'null' in the logprobs output

    def choice_params(self, choice: int) -> SamplingParams:
        """Choice i of a seeded request draws from seed + i: reproducible, and the choices differ."""
        if self.params.seed is None or choice == 0:
            return self.params
        return dataclasses.replace(self.params, seed=(self.params.seed + choice) % 2**64)


def parse_request(tensors: Mapping[str, np.ndarray], parameters: str = "{}",
                  max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES) -> GenerateRequest:
    """Build a GenerateRequest from the request's tensors and its parameters (Triton's JSON text of
    `request.parameters()`), which are read as sampling keys only when `sampling_parameters` is absent."""
    prompt = _prompt(tensors.get(TEXT_INPUT.name), max_prompt_bytes)
    if SAMPLING_PARAMETERS.name in tensors:
        sampling = parse_sampling_json(_text(tensors[SAMPLING_PARAMETERS.name], SAMPLING_PARAMETERS.name))
    else:
        sampling = parse_request_parameters(parameters)
    for name, field in FIELDS_BY_TENSOR.items():
        if name in tensors:
            sampling[field.key] = check_value(field, _tensor_value(tensors[name], name, field.is_list))
    _check_trtllm_inputs(tensors, sampling)
    n = sampling.pop("n", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise ProtocolError(f"'n' must be in [1, {MAX_CHOICES}], got {n}")
    outputs = frozenset(output for flag in RETURN_FLAGS if _flag(tensors.get(flag.name), flag.name)
                        for output in flag.outputs)
    for single in ("output_ids", "output_log_probs"):
        if n > 1 and single in outputs:
            raise ProtocolError(f"'{single}' is sent for single-choice requests only; this one has n={n}")
    stream = _flag(tensors.get(STREAM.name), STREAM.name)
    echo_prompt = _echo_prompt(tensors.get(EXCLUDE_INPUT_IN_OUTPUT.name), stream)
    client_logprobs = sampling.get("logprobs")
    # The sums need each sampled token's logprob, which the engine computes only when asked.
    if client_logprobs is None and outputs & {"cumulative_logprob", "cum_log_probs", "output_log_probs"}:
        sampling["logprobs"] = 0
    try:
        params = SamplingParams(**sampling)
    except ValueError as e:  # range checks live with SamplingParams; its messages name the field
        raise ProtocolError(str(e)) from None
    return GenerateRequest(prompt, params, n, stream, echo_prompt, outputs, client_logprobs)


def _echo_prompt(exclude: np.ndarray | None, stream: bool) -> bool:
    """vLLM backend: without the input a whole response echoes the prompt and a stream does not;
    a stream that asks for the echo is an error."""
    if exclude is None:
        return not stream
    echo = not _flag(exclude, EXCLUDE_INPUT_IN_OUTPUT.name)
    if echo and stream:
        raise StreamEchoError(STREAM_ECHO_ERROR)
    return echo


def _check_trtllm_inputs(tensors: Mapping[str, np.ndarray], sampling: dict[str, Any]) -> None:
    """TensorRT-LLM ensemble inputs with no sampling key of their own (gemma_protocol.INPUTS)."""
    if BEAM_WIDTH.name in tensors and (width := _tensor_value(tensors[BEAM_WIDTH.name], BEAM_WIDTH.name)) != 1:
        raise ProtocolError(f"'beam_width' must be 1 (this model samples; it has no beam search), got {width}")
    for spec in FALSE_ONLY_FLAGS:
        if _flag(tensors.get(spec.name), spec.name):
            raise ProtocolError(f"'{spec.name}' is not supported by this model: it must be false or absent")
    if END_ID.name in tensors:
        end_id = _tensor_value(tensors[END_ID.name], END_ID.name)
        if end_id >= 0:  # TensorRT-LLM's -1: the model's own end id, which ends generation anyway
            sampling["stop_token_ids"] = tuple(sampling.get("stop_token_ids", ())) + (end_id,)


def _prompt(array: np.ndarray | None, max_prompt_bytes: int) -> str:
    if array is None:
        raise ProtocolError("'text_input' is required")
    raw = _one(array, "text_input")
    raw = raw if isinstance(raw, bytes) else str(raw).encode()
    if len(raw) > max_prompt_bytes:
        raise ProtocolError(f"'text_input' is {len(raw)} bytes; the limit is {max_prompt_bytes}")
    prompt = _text(array, "text_input")
    if not prompt:
        raise ProtocolError("'text_input' is empty")
    return prompt


def _one(array: np.ndarray, name: str) -> Any:
    if array.size != 1:
        raise ProtocolError(f"'{name}' must hold one element, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _decode(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"'{name}' is not valid UTF-8") from None
    return str(value)


def _text(array: np.ndarray, name: str) -> str:
    return _decode(_one(array, name), name)


def _flag(array: np.ndarray | None, name: str) -> bool:
    return False if array is None else bool(_one(array, name))


def _tensor_value(array: np.ndarray, name: str, is_list: bool = False) -> Any:
    """A scalar tensor's value as the Python type the JSON form would carry."""
    if is_list:
        return [_decode(v, name) if array.dtype == object else v.item() for v in array.reshape(-1)]
    value = _one(array, name)
    return _decode(value, name) if isinstance(value, bytes) else value.item()
