"""serving/requests.py: a request's tensors (numpy arrays by name, as the Triton model hands them over)
-> the engine's prompt and SamplingParams, or a ProtocolError naming the field. No server needed."""
from __future__ import annotations

import json

import numpy as np
import pytest
from gemma_protocol import ProtocolError

from backend.sampling import SamplingParams
from serving.requests import parse_request


def tensors(prompt: str = "Hi", **values) -> dict[str, np.ndarray]:
    arrays = {"text_input": np.array([prompt.encode()], dtype=np.object_)}
    for name, value in values.items():
        if isinstance(value, str):
            arrays[name] = np.array([value.encode()], dtype=np.object_)
        else:
            arrays[name] = np.array(value if isinstance(value, list) else [value])
    return arrays


def test_json_and_scalar_tensors_build_sampling_params():
    request = parse_request(tensors(sampling_parameters='{"max_tokens": 5, "temperature": 1, "stop": ["\\n"]}',
                                    top_k=np.int64(3), stream=np.bool_(True)))
    assert request.prompt == "Hi" and request.stream and not request.exclude_input_in_output
    assert request.params == SamplingParams(max_tokens=5, temperature=1.0, top_k=3, stop=("\n",))
    assert isinstance(request.params.temperature, float)


def test_a_scalar_tensor_wins_over_the_same_json_key():
    request = parse_request(tensors(sampling_parameters='{"max_tokens": 5}', max_tokens=np.int64(2)))
    assert request.params.max_tokens == 2


@pytest.mark.parametrize("json_text, field", [
    ('{"max_tokens": true}', "max_tokens"), ('{"top_p": "x"}', "top_p"), ('{"stop": "END"}', "stop"),
    ('{"stop_token_ids": [1.5]}', "stop_token_ids"), ('{"ignore_eos": 1}', "ignore_eos"),
    ('{"max_tokens": 0}', "max_tokens"), ('{"beam_width": 2}', "beam_width"),
    ('{"max_tokens": 4', "sampling_parameters"), ('[1]', "sampling_parameters"),
])
def test_bad_sampling_json_names_the_field(json_text, field):
    with pytest.raises(ProtocolError, match=field):
        parse_request(tensors(sampling_parameters=json_text))


def test_bad_prompts_name_text_input():
    for bad in ({}, tensors(""), tensors("x" * 100)):
        with pytest.raises(ProtocolError, match="text_input"):
            parse_request(bad, max_prompt_bytes=50)


@pytest.mark.parametrize("json_text, words", [
    ("[" * 100_000, ["sampling_parameters", "bytes"]),  # over the size limit
    ("[" * 20_000 + "]" * 20_000, ["sampling_parameters", "levels"]),  # within it, nested too deep
    ('{"stop": [' * 5 + "]}" * 5, ["sampling_parameters", "levels"]),
    ('{"max_tokens": ' + "9" * 5000 + "}", ["sampling_parameters", "number"]),
    ('{"temperature": ' + "9" * 400 + "}", ["temperature", "400 digits"]),
])
def test_hostile_sampling_json_is_refused_before_it_is_parsed(json_text, words):
    with pytest.raises(ProtocolError) as info:
        parse_request(tensors(sampling_parameters=json_text))
    assert all(word in str(info.value) for word in words), info.value


def test_brackets_inside_strings_do_not_count_as_nesting():
    request = parse_request(tensors(sampling_parameters=json.dumps({"stop": ["[[[[[[[[[[" * 10, '"{{{{']})))
    assert request.params.stop == ("[[[[[[[[[[" * 10, '"{{{{')


@pytest.mark.parametrize("parameters, words", [
    ('{"temprature": 0.5}', ["'temprature'", "did you mean 'temperature'"]),
    ('{"max_token": 2, "foo": "bar"}', ["'foo'", "'max_token'", "did you mean 'max_tokens'"]),
    ('{"ignore_eos": true}', ["'ignore_eos'", "inside 'sampling_parameters'"]),
])
def test_request_parameters_are_refused_naming_them(parameters, words):
    with pytest.raises(ProtocolError) as info:
        parse_request(tensors(), parameters)
    assert all(word in str(info.value) for word in words), info.value


def test_no_request_parameters_is_fine():
    assert parse_request(tensors(), "{}").prompt == parse_request(tensors(), "").prompt == "Hi"


def test_64_bit_scalars_keep_their_value():
    # Not wrapped to 3: the engine then refuses it against its context, showing the value sent.
    assert parse_request(tensors(max_tokens=np.int64(2**32 + 3))).params.max_tokens == 2**32 + 3
    with pytest.raises(ProtocolError, match="'max_tokens' must be >= 1, got -2147483649"):
        parse_request(tensors(max_tokens=np.int64(-(2**31) - 1)))
