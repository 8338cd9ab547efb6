"""One Triton request's input tensors -> (prompt, SamplingParams, response options).

Knows the tensor contract (gemma_protocol) and the engine's SamplingParams but not Triton: it takes
plain numpy arrays by tensor name (and the request's parameters as Triton's JSON text), so it is
tested without a server. Every rejection is a `ProtocolError` (a ValueError) whose message names the
offending field; the Triton model turns it into INVALID_ARG.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from gemma_protocol import (FIELDS_BY_KEY, FIELDS_BY_TENSOR, INPUTS, ProtocolError, check_value,
                            parse_sampling_json)

from backend.sampling import SamplingParams

DEFAULT_MAX_PROMPT_BYTES = 256 * 1024


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    params: SamplingParams
    stream: bool = False
    exclude_input_in_output: bool = False


def parse_request(tensors: Mapping[str, np.ndarray], parameters: str = "{}",
                  max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES) -> GenerateRequest:
    """Build a GenerateRequest from the request's tensors; scalar tensors win over JSON keys.

    `parameters`: the request's parameters as Triton gives them (`request.parameters()`, a JSON
    object). This model takes none, and Triton's HTTP generate endpoint turns every JSON key that is
    not an input into one, so a typo ("temprature") arrives here: refused, never ignored."""
    _refuse_parameters(parameters)
    prompt = _prompt(tensors.get("text_input"), max_prompt_bytes)
    sampling = parse_sampling_json(_text(tensors["sampling_parameters"], "sampling_parameters")) \
        if "sampling_parameters" in tensors else {}
    for name, field in FIELDS_BY_TENSOR.items():
        if name in tensors:
            sampling[field.key] = check_value(field, _tensor_value(tensors[name], name, field.is_list))
    try:
        params = SamplingParams(**sampling)
    except ValueError as e:  # range checks live with SamplingParams; its messages name the field
        raise ProtocolError(str(e)) from None
    return GenerateRequest(prompt, params,
                           stream=_flag(tensors.get("stream"), "stream"),
                           exclude_input_in_output=_flag(tensors.get("exclude_input_in_output"),
                                                         "exclude_input_in_output"))


INPUT_NAMES = sorted(spec.name for spec in INPUTS)
# What a misspelt key may have meant: the inputs and the sampling keys.
KNOWN_NAMES = sorted(set(INPUT_NAMES) | set(FIELDS_BY_KEY))


def _refuse_parameters(parameters: str) -> None:
    names = sorted(json.loads(parameters)) if parameters.strip() else []
    if names:
        raise ProtocolError(f"unknown request parameter(s) {', '.join(map(_with_hint, names))}; the model's "
                            f"inputs are {INPUT_NAMES}")


def _with_hint(name: str) -> str:
    if name in FIELDS_BY_KEY:  # a sampling key with no input of its own (stop_token_ids, ignore_eos)
        return f"'{name}' (a sampling key: send it inside 'sampling_parameters')"
    match = difflib.get_close_matches(name, KNOWN_NAMES, 1)
    return f"'{name}' (did you mean '{match[0]}'?)" if match else f"'{name}'"


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


def _tensor_value(array: np.ndarray, name: str, is_list: bool) -> Any:
    """A scalar tensor's value as the Python type the JSON form would carry."""
    if is_list:
        return [_decode(v, name) if array.dtype == object else v.item() for v in array.reshape(-1)]
    value = _one(array, name)
    return _decode(value, name) if isinstance(value, bytes) else value.item()
