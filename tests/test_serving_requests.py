"""serving/requests.py: a request's tensors (numpy arrays by name, as the Triton model hands them over)
-> the engine's prompt and SamplingParams, or a ProtocolError naming the field. No server needed."""
from __future__ import annotations

import json

import numpy as np
import pytest
from gemma_protocol import ProtocolError

from backend.params import SamplingParams
from serving.requests import StreamEchoError, parse_request


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
                                    top_k=np.int32(3), stream=np.bool_(True)))
    assert request.prompt == "Hi" and request.stream and not request.echo_prompt
    assert request.params == SamplingParams(max_tokens=5, temperature=1.0, top_k=3, stop=("\n",))
    assert isinstance(request.params.temperature, float)


def test_a_scalar_tensor_wins_over_the_same_json_key():
    request = parse_request(tensors(sampling_parameters='{"max_tokens": 5}', max_tokens=np.int32(2)))
    assert request.params.max_tokens == 2


def test_string_values_convert_as_the_vllm_backend_converts_them():
    request = parse_request(tensors(sampling_parameters=json.dumps(
        {"temperature": "0.5", "top_p": "1", "max_tokens": "1500", "seed": "7", "ignore_eos": "false",
         "stop": "END", "top_k": "-1"})))
    assert request.params == SamplingParams(temperature=0.5, top_p=1.0, max_tokens=1500, seed=7, ignore_eos=False,
                                            stop=("END",), top_k=0)


@pytest.mark.parametrize("json_text, field", [
    ('{"max_tokens": true}', "max_tokens"), ('{"top_p": "x"}', "top_p"), ('{"max_tokens": 2.5}', "max_tokens"),
    ('{"stop_token_ids": [1.5]}', "stop_token_ids"), ('{"ignore_eos": "maybe"}', "ignore_eos"),
    ('{"max_tokens": 0}', "max_tokens"), ('{"beam_width": 2}', "beam_width"), ('{"n": 0}', "'n'"),
    ('{"min_p": 0.3}', "min_p"), ('{"structured_outputs": "{}"}', "structured_outputs"),
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
    ('{"stop": [' * 21 + "]}" * 21, ["sampling_parameters", "levels"]),
    ('{"max_tokens": ' + "9" * 5000 + "}", ["sampling_parameters", "number"]),
    ('{"temperature": ' + "9" * 400 + "}", ["temperature", "400 digits"]),
])
def test_hostile_sampling_json_is_refused_before_it_is_parsed(json_text, words):
    with pytest.raises(ProtocolError) as info:
        parse_request(tensors(sampling_parameters=json_text))
    assert all(word in str(info.value) for word in words), info.value


def test_a_deep_json_schema_and_the_older_guided_decoding_key_are_read():
    schema = {"type": "string"}
    for _ in range(12):  # twelve levels of nested objects: 24 levels of JSON inside the schema
        schema = {"type": "object", "properties": {"inner": schema}}
    request = parse_request(tensors(sampling_parameters=json.dumps({"guided_decoding": {"json": schema}})))
    assert json.loads(request.params.structured_outputs.json) == schema
    by_parameters = parse_request(tensors(), json.dumps({"structured_outputs": json.dumps({"regex": "[0-9]+"})}))
    assert by_parameters.params.structured_outputs.regex == "[0-9]+"


def test_brackets_inside_strings_do_not_count_as_nesting():
    request = parse_request(tensors(sampling_parameters=json.dumps({"stop": ["[[[[[[[[[[" * 10, '"{{{{']})))
    assert request.params.stop == ("[[[[[[[[[[" * 10, '"{{{{')


def test_request_parameters_are_the_sampling_keys_without_the_tensor():
    request = parse_request(tensors(), '{"temperature": "0", "max_tokens": 3, "stream": false}')
    assert request.params == SamplingParams(temperature=0.0, max_tokens=3)


def test_request_parameters_are_ignored_beside_the_tensor():
    request = parse_request(tensors(sampling_parameters='{"max_tokens": 2}'), '{"bogus": 1, "max_tokens": "x"}')
    assert request.params.max_tokens == 2


@pytest.mark.parametrize("parameters, words", [
    ('{"temprature": 0.5}', ["'temprature'", "did you mean 'temperature'"]),
    ('{"max_token": 2}', ["'max_token'", "did you mean 'max_tokens'"]),
])
def test_misspelt_request_parameters_are_refused_naming_them(parameters, words):
    with pytest.raises(ProtocolError) as info:
        parse_request(tensors(), parameters)
    assert all(word in str(info.value) for word in words), info.value


def test_no_request_parameters_is_fine():
    assert parse_request(tensors(), "{}").prompt == parse_request(tensors(), "").prompt == "Hi"


def test_the_prompt_is_echoed_by_whole_responses_only():
    assert parse_request(tensors()).echo_prompt
    assert not parse_request(tensors(stream=np.bool_(True))).echo_prompt
    assert not parse_request(tensors(exclude_input_in_output=np.bool_(True))).echo_prompt
    with pytest.raises(StreamEchoError, match="`exclude_input_in_output` = False is not allowed"):
        parse_request(tensors(stream=np.bool_(True), exclude_input_in_output=np.bool_(False)))


def test_return_flags_name_the_outputs_and_sums_make_the_engine_compute_logprobs():
    request = parse_request(tensors(return_finish_reason=np.bool_(True), return_cumulative_logprob=np.bool_(True),
                                    return_logprobs=np.bool_(False)))
    assert request.outputs == {"finish_reason", "cumulative_logprob"}
    assert request.params.logprobs == 0 and request.logprobs is None  # the `logprobs` output stays 'null'


def test_n_choices_draw_from_consecutive_seeds():
    request = parse_request(tensors(sampling_parameters='{"n": "3", "seed": 5}'))
    assert request.n == 3 and [request.choice_params(i).seed for i in range(3)] == [5, 6, 7]
    with pytest.raises(ProtocolError, match="single-choice"):
        parse_request(tensors(sampling_parameters='{"n": 2}', return_output_ids=np.bool_(True)))


def test_genai_perfs_min_length_is_min_tokens():
    assert parse_request(tensors(min_length=np.int32(5), max_tokens=np.int32(5))).params.min_tokens == 5


def test_trtllm_inputs_that_change_nothing_here_are_accepted():
    request = parse_request(tensors(beam_width=np.int32(1), pad_id=np.int32(0), length_penalty=np.float32(1.0),
                                    end_id=np.int32(7), return_context_logits=np.bool_(False),
                                    num_return_sequences=np.int32(2)))
    assert request.params.stop_token_ids == (7,) and request.n == 2
    for bad in (dict(beam_width=np.int32(4)), dict(return_generation_logits=np.bool_(True))):
        with pytest.raises(ProtocolError, match=next(iter(bad))):
            parse_request(tensors(**bad))


def test_fp32_and_int32_scalars_keep_their_value():
    request = parse_request(tensors(temperature=np.float32(0.25), max_tokens=np.int32(2**31 - 1)))
    assert request.params.temperature == 0.25 and request.params.max_tokens == 2**31 - 1
    with pytest.raises(ProtocolError, match="'max_tokens' must be >= 1, got -3"):
        parse_request(tensors(max_tokens=np.int32(-3)))


def test_null_max_tokens_is_left_to_the_engine():
    assert parse_request(tensors(sampling_parameters='{"max_tokens": null}')).params.max_tokens is None
