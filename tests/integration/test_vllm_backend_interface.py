"""Clients written for Triton's vLLM backend, run unchanged against the Gemma model.

Written from the vLLM backend's documentation and source (triton-inference-server/vllm_backend: its
README's sample client and curl request, docs/additional_outputs.md, src/utils/request.py and its CI's
tests), not from this repository's code: plain tritonclient requests in that backend's shapes,
string-valued sampling parameters, request parameters, the five `return_*` flags, exclude_input_in_output,
cancellation, and the TensorRT-LLM ensemble's scalar tensor types. docs/vllm-backend.md is the table;
test_engine_health.py has its health check.
"""
from __future__ import annotations

import itertools
import json
import queue
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.support.server import MODEL
from tests.support.waiting import wait_for

PROMPT = "The capital of France is"
GREEDY = {"temperature": "0", "top_p": "1"}  # as the vLLM backend's tests send them: strings
FLAGS = ("return_finish_reason", "return_cumulative_logprob", "return_logprobs", "return_num_input_tokens",
         "return_num_output_tokens")


def vllm_inputs(prompt, stream, sampling=None, exclude_input_in_output=None, **flags):
    """The request tensors of the vLLM backend's sample client (samples/client.py) and CI helpers."""
    inputs = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("stream", [1], "BOOL")]
    inputs[0].set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([stream], dtype=bool))
    if sampling is not None:
        inputs.append(grpcclient.InferInput("sampling_parameters", [1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([json.dumps(sampling).encode("utf-8")], dtype=np.object_))
    if exclude_input_in_output is not None:
        inputs.append(grpcclient.InferInput("exclude_input_in_output", [1], "BOOL"))
        inputs[-1].set_data_from_numpy(np.array([exclude_input_in_output], dtype=bool))
    for name, value in flags.items():
        if value is not None:
            inputs.append(grpcclient.InferInput(name, [1], "BOOL"))
            inputs[-1].set_data_from_numpy(np.array([value], dtype=bool))
    return inputs


def typed(name, datatype, values):
    """A TensorRT-LLM-ensemble-typed input: INT32 max_tokens, FP32 temperature, BYTES stop words..."""
    array = np.array([v.encode() for v in values], dtype=np.object_) if datatype == "BYTES" else \
        np.array(values, dtype={"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": bool}[datatype])
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def infer(server, inputs, parameters=None, timeout=120):
    """One request on a gRPC stream (the vLLM backend's clients all stream): its responses, or the error."""
    responses: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(lambda result, error: responses.put((result, error)))
        client.async_stream_infer(MODEL, inputs=inputs, parameters=parameters, enable_empty_final_response=True)
        results = []
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                client.stop_stream()
                return results, error
            if result.get_response().outputs:
                results.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                client.stop_stream()
                return results, None


def ok(server, inputs, parameters=None):
    results, error = infer(server, inputs, parameters)
    assert error is None, error
    assert results
    return results


def text(results) -> str:
    return "".join(r.as_numpy("text_output")[0].decode() for r in results)


@pytest.fixture(scope="module")
def vllm_server(default_server):
    """The packaged Gemma 3 270M as shipped: these clients expect real text."""
    return default_server


# --- sampling parameters -----------------------------------------------------------------------------

def test_the_sample_clients_string_valued_parameters_are_converted(vllm_server):
    sampling = {"temperature": "0.1", "top_p": "0.95", "max_tokens": "12"}
    results = ok(vllm_server, vllm_inputs(PROMPT, False, sampling, exclude_input_in_output=True,
                                          return_num_output_tokens=True), parameters=sampling)
    assert len(results) == 1 and int(results[0].as_numpy("num_output_tokens")[0]) == 12
    assert text(results).strip()


def test_request_parameters_are_the_sampling_parameters_without_the_tensor(vllm_server):
    by_tensor = ok(vllm_server, vllm_inputs(PROMPT, False, {**GREEDY, "max_tokens": "5"},
                                            return_num_output_tokens=True))
    by_parameters = ok(vllm_server, vllm_inputs(PROMPT, False, return_num_output_tokens=True),
                       parameters={**GREEDY, "max_tokens": "5"})
    assert int(by_parameters[0].as_numpy("num_output_tokens")[0]) == 5
    assert text(by_parameters) == text(by_tensor)


def test_request_parameters_are_ignored_beside_the_tensor(vllm_server):
    ok(vllm_server, vllm_inputs(PROMPT, False, {**GREEDY, "max_tokens": "2"}),
       parameters={"not_a_sampling_key": "x", "max_tokens": "junk"})


def test_the_readme_curl_request_through_the_generate_endpoint(vllm_server):
    status, body = vllm_server.post(f"/v2/models/{MODEL}/generate",
                                    {"text_input": PROMPT, "parameters": {"stream": False, "temperature": 0}})
    assert status == 200, body
    reply = json.loads(body)
    assert reply["model_name"] == MODEL and reply["text_output"].startswith(PROMPT)
    assert len(reply["text_output"]) > len(PROMPT)


@pytest.mark.parametrize("sampling, field", [
    ({"structured_outputs": json.dumps({"json": {"type": "object"}, "regex": "x"})}, "structured_outputs"),
    ({"lora_name": "adapter"}, "lora_name"), ({"min_p": "0.2"}, "min_p"), ({"max_tokens": "many"}, "max_tokens"),
    ({"temprature": "0"}, "temprature"), ({"n": "0"}, "'n'"),
])
def test_keys_not_implemented_or_malformed_are_refused_naming_them(vllm_server, sampling, field):
    _, error = infer(vllm_server, vllm_inputs(PROMPT, False, sampling))
    assert error is not None and field in error.message() and "INVALID_ARGUMENT" in error.message()


def test_keys_at_their_vllm_default_are_accepted(vllm_server):
    ok(vllm_server, vllm_inputs(PROMPT, False, {"max_tokens": "2", "min_p": "0", "skip_special_tokens": "true",
                                                "best_of": 1, "top_k": "-1", "ignore_eos": "false"}))


# --- structured outputs (vLLM's `structured_outputs`; docs/structured-outputs.md) ------------------------

RECORD = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_schema_in_sampling_parameters_constrains_the_output(vllm_server, stream):
    import jsonschema

    sampling = {"temperature": "0", "max_tokens": "48", "structured_outputs": {"json": RECORD}}
    results = ok(vllm_server, vllm_inputs("A JSON record of a person:\n", stream, sampling,
                                          exclude_input_in_output=True, return_finish_reason=True))
    jsonschema.validate(json.loads(text(results)), RECORD)
    assert results[-1].as_numpy("finish_reason")[0].decode() == "stop"


def test_request_parameters_and_the_older_guided_decoding_key_carry_constraints(vllm_server):
    by_parameters = ok(vllm_server, vllm_inputs("Today's date in ISO format is ", False, exclude_input_in_output=True),
                       parameters={"temperature": "0", "max_tokens": "16",
                                   "structured_outputs": json.dumps({"regex": r"\d{4}-\d{2}-\d{2}"})})
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", text(by_parameters))
    choices = ok(vllm_server, vllm_inputs("Is the sky blue? Answer:", False, {
        "temperature": "1", "seed": "3", "n": "3", "max_tokens": "4",
        "guided_decoding": {"choice": ["yes", "no"]}}, exclude_input_in_output=True))
    assert [c.decode() for c in choices[0].as_numpy("text_output")] and \
        {c.decode() for c in choices[0].as_numpy("text_output")} <= {"yes", "no"}


@pytest.mark.parametrize("constraint, field", [({"regex": "a(b"}, "structured_outputs.regex"),
                                               ({"json": {"type": "nope"}}, "structured_outputs.json"),
                                               ({"grammar": "start: nowhere"}, "structured_outputs.grammar")])
def test_an_invalid_constraint_is_invalid_argument_naming_it_and_the_server_keeps_serving(vllm_server, constraint,
                                                                                          field):
    _, error = infer(vllm_server, vllm_inputs(PROMPT, True, {"structured_outputs": constraint}))
    assert error is not None and "INVALID_ARGUMENT" in error.message() and field in error.message()
    ok(vllm_server, vllm_inputs(PROMPT, False, {**GREEDY, "max_tokens": "2"}))


# --- additional outputs (docs/additional_outputs.md) ---------------------------------------------------

# Every combination of the five flags true or false, and all of them absent, for each stream mode and
# logprobs setting (the vLLM backend's CI also mixes absent with true/false: 3^5 combinations, most of
# which these cover in effect, since absent and false must send the same).
FLAG_SETS = [dict(zip(FLAGS, values)) for values in itertools.product((True, False), repeat=len(FLAGS))] + \
    [dict.fromkeys(FLAGS, None)]


ADDITIONAL_OUTPUT_CASES = list(enumerate(itertools.product((True, False), (None, 0, 2), FLAG_SETS)))


def additional_outputs_request(stream, logprobs, flags):
    sampling = {**GREEDY, "max_tokens": "16", "ignore_eos": "true"}
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    return vllm_inputs("In this example,", stream, sampling, **flags), sampling


@pytest.fixture(scope="module")
def additional_outputs_answers(vllm_server):
    """Every case's responses, from requests sent all at once (198 one after another took ~2 minutes
    of the suite; the engine batches them, and each case still gets a stream of its own)."""
    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(lambda case: infer(vllm_server, *additional_outputs_request(*case[1])),
                             ADDITIONAL_OUTPUT_CASES))


@pytest.mark.parametrize("case, stream, logprobs, flags", [
    (case, stream, logprobs, flags) for case, (stream, logprobs, flags) in ADDITIONAL_OUTPUT_CASES])
def test_additional_outputs_are_sent_only_when_asked(additional_outputs_answers, case, stream, logprobs, flags):
    results, error = additional_outputs_answers[case]
    assert error is None, error
    assert results
    assert len(results) == 1 or stream
    previous_cumulative = 0.0
    for i, result in enumerate(results):
        last = i == len(results) - 1
        for flag, outputs in (("return_finish_reason", ["finish_reason"]),
                              ("return_cumulative_logprob", ["cumulative_logprob"]),
                              ("return_logprobs", ["logprobs"]), ("return_num_input_tokens", ["num_input_tokens"]),
                              ("return_num_output_tokens", ["num_output_tokens"])):
            for output in outputs:
                assert (result.as_numpy(output) is not None) == bool(flags[flag]), (flag, output)
        if flags["return_finish_reason"]:
            assert result.as_numpy("finish_reason")[0].decode() == ("length" if last else "None")
        if flags["return_cumulative_logprob"]:
            cumulative = float(result.as_numpy("cumulative_logprob")[0])
            assert cumulative < previous_cumulative  # every response adds a token's (negative) logprob
            previous_cumulative = cumulative
        if flags["return_num_input_tokens"]:
            assert 0 < int(result.as_numpy("num_input_tokens")[0]) <= len("In this example,")
        if flags["return_num_output_tokens"]:
            assert int(result.as_numpy("num_output_tokens")[0]) > 0
        if flags["return_logprobs"]:
            entries = json.loads(result.as_numpy("logprobs")[0])
            if logprobs is None:
                assert entries is None
                continue
            response_text = result.as_numpy("text_output")[0].decode()
            if not stream:
                response_text = response_text.removeprefix("In this example,")  # echoed without the input
            sampled_text = ""
            for position in entries:
                assert 1 <= len(position) <= logprobs + 1
                ranks = sorted(entry["rank"] for entry in position.values())
                assert ranks[0] == 1 and all(isinstance(int(token_id), int) for token_id in position)
                first_id, first = next(iter(position.items()))  # the sampled token; greedy: rank 1
                assert first["rank"] == 1 and isinstance(first["logprob"], float)
                sampled_text += first["decoded_token"]
            assert sampled_text == response_text
    if flags["return_num_output_tokens"]:
        assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in results) == 16


def test_cumulative_logprob_is_the_sum_of_the_tokens_logprobs(vllm_server):
    sampling = {**GREEDY, "max_tokens": "6", "logprobs": 0}
    (result,) = ok(vllm_server, vllm_inputs(PROMPT, False, sampling, return_cumulative_logprob=True,
                                            return_logprobs=True))
    entries = json.loads(result.as_numpy("logprobs")[0])
    total = sum(next(iter(position.values()))["logprob"] for position in entries)
    assert result.as_numpy("cumulative_logprob").dtype == np.float32
    assert float(result.as_numpy("cumulative_logprob")[0]) == pytest.approx(total, rel=1e-5)


# --- exclude_input_in_output ---------------------------------------------------------------------------

def test_a_whole_response_echoes_the_prompt_unless_excluded(vllm_server):
    sampling = {**GREEDY, "max_tokens": "8"}
    default = text(ok(vllm_server, vllm_inputs(PROMPT, False, sampling)))
    echoed = text(ok(vllm_server, vllm_inputs(PROMPT, False, sampling, exclude_input_in_output=False)))
    excluded = text(ok(vllm_server, vllm_inputs(PROMPT, False, sampling, exclude_input_in_output=True)))
    assert default == echoed == PROMPT + excluded and excluded


def test_a_stream_sends_only_new_text(vllm_server):
    sampling = {**GREEDY, "max_tokens": "8"}
    streamed = ok(vllm_server, vllm_inputs(PROMPT, True, sampling))
    excluded = ok(vllm_server, vllm_inputs(PROMPT, True, sampling, exclude_input_in_output=True))
    whole = text(ok(vllm_server, vllm_inputs(PROMPT, False, sampling, exclude_input_in_output=True)))
    assert len(streamed) > 1 and text(streamed) == text(excluded) == whole


def test_a_stream_that_asks_for_the_prompt_gets_the_vllm_backends_error(vllm_server):
    results, error = infer(vllm_server, vllm_inputs(PROMPT, True, GREEDY, exclude_input_in_output=False))
    assert not results and error is not None
    assert error.message() == "Error generating stream: When streaming, `exclude_input_in_output` = False is not allowed."


# --- n ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_are_one_text_output_element_each(vllm_server, stream):
    sampling = {"n": "2", "temperature": "1", "seed": "7", "max_tokens": "6", "ignore_eos": "true"}
    results = ok(vllm_server, vllm_inputs(PROMPT, stream, sampling, exclude_input_in_output=True,
                                          return_finish_reason=True, return_num_output_tokens=True))
    texts, counts = ["", ""], [0, 0]
    for result in results:
        assert result.as_numpy("text_output").shape == (2,)
        for i in range(2):
            texts[i] += result.as_numpy("text_output")[i].decode()
            counts[i] += int(result.as_numpy("num_output_tokens")[i])
    assert counts == [6, 6] and all(texts)
    assert [r.decode() for r in results[-1].as_numpy("finish_reason")] == ["length", "length"]


# --- cancellation ----------------------------------------------------------------------------------------

def test_cancelling_gives_the_client_cancelled_and_frees_the_request(vllm_server):
    sampling = {**GREEDY, "max_tokens": "1500", "ignore_eos": "true"}
    errors: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(vllm_server.grpc_url)
    client.start_stream(lambda result, error: errors.put(error))
    client.async_stream_infer(MODEL, inputs=vllm_inputs("Write a long poem.", False, sampling), parameters=sampling)
    assert wait_for(lambda: vllm_server.metric("gemma_running_requests") == 1, timeout=60)
    client.stop_stream(cancel_requests=True)
    error = errors.get(timeout=10)
    assert isinstance(error, InferenceServerException) and error.status() == "StatusCode.CANCELLED"
    assert errors.empty()
    client.close()
    assert wait_for(lambda: vllm_server.metric("gemma_running_requests") == 0
                    and vllm_server.metric("gemma_kv_blocks_used") == 0, timeout=30)


# --- TensorRT-LLM ensemble types ---------------------------------------------------------------------------

def test_trtllm_typed_scalars_are_accepted(vllm_server):
    inputs = [typed("text_input", "BYTES", [PROMPT]), typed("max_tokens", "INT32", [6]),
              typed("temperature", "FP32", [0.7]), typed("top_k", "INT32", [20]), typed("top_p", "FP32", [0.9]),
              typed("repetition_penalty", "FP32", [1.1]), typed("presence_penalty", "FP32", [0.1]),
              typed("frequency_penalty", "FP32", [0.1]), typed("min_tokens", "INT32", [2]),
              typed("seed", "UINT64", [42]), typed("beam_width", "INT32", [1]), typed("stream", "BOOL", [False]),
              typed("stop_words", "BYTES", ["zzzz"]), typed("bad_words", "BYTES", ["Paris"]),
              typed("end_id", "INT32", [-1]), typed("pad_id", "INT32", [0]), typed("length_penalty", "FP32", [1.0]),
              typed("exclude_input_in_output", "BOOL", [True]), typed("return_log_probs", "BOOL", [True]),
              typed("return_num_output_tokens", "BOOL", [True])]
    first = ok(vllm_server, inputs)
    again = ok(vllm_server, inputs)
    assert text(first) == text(again) and "Paris" not in text(first)  # seeded; bad word never generated
    (result,) = first
    assert int(result.as_numpy("num_output_tokens")[0]) == 6
    per_token = result.as_numpy("output_log_probs")
    assert per_token.shape == (1, 6) and per_token.dtype == np.float32
    assert float(result.as_numpy("cum_log_probs")[0]) == pytest.approx(float(per_token.sum()), rel=1e-5)


def test_genai_perfs_tensorrtllm_payload_gets_exactly_the_tokens_it_asks_for(vllm_server):
    """genai-perf --backend tensorrtllm --output-tokens-mean 8 --output-tokens-mean-deterministic --streaming."""
    results = ok(vllm_server, [typed("text_input", "BYTES", ["Tell me about France."]), typed("max_tokens", "INT32", [8]),
                               typed("min_length", "INT32", [8]), typed("stream", "BOOL", [True]),
                               typed("return_num_output_tokens", "BOOL", [True])])
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in results) == 8


@pytest.mark.parametrize("name, datatype, value, words", [
    ("beam_width", "INT32", 2, ["beam_width", "1"]),
    ("return_generation_logits", "BOOL", True, ["return_generation_logits"]),
    ("max_tokens", "INT32", -3, ["max_tokens"]),
    ("top_p", "FP32", 1.5, ["top_p"]),
])
def test_trtllm_values_this_model_cannot_honour_are_refused_naming_them(vllm_server, name, datatype, value, words):
    _, error = infer(vllm_server, [typed("text_input", "BYTES", [PROMPT]), typed(name, datatype, [value])])
    assert error is not None and "INVALID_ARGUMENT" in error.message()
    assert all(word in error.message() for word in words), error.message()


def test_http_generate_takes_trtllm_style_json(vllm_server):
    status, body = vllm_server.post(f"/v2/models/{MODEL}/generate",
                                    {"text_input": PROMPT, "max_tokens": 4, "temperature": 0.0,
                                     "exclude_input_in_output": True, "return_num_output_tokens": True})
    assert status == 200, body
    assert json.loads(body)["num_output_tokens"] == 4
