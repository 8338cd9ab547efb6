"""serving/responses.py: the vLLM backend's response rules, without a server: what each response of a
streamed or whole request holds, per choice, and only the outputs asked for; which error ends a
request, with which Triton code and message."""
from __future__ import annotations

import pytest
from gemma_protocol import ProtocolError, split_error_status

from backend.errors import EngineOverloadedError, InvalidRequestError
from backend.outputs import RequestOutput
from backend.params import SamplingParams, TokenLogprobs
from serving.requests import STREAM_ECHO_ERROR, GenerateRequest, StreamEchoError
from serving.responses import (MODEL_FAILURE, SHUTTING_DOWN, ErrorResponse, ResponseBuilder, refusal,
                               unhealthy_refusal)

EVERY_OUTPUT = frozenset({"finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens", "num_output_tokens",
                          "output_ids", "num_cached_tokens", "cum_log_probs", "output_log_probs"})


def output(text, ids, finish=None, logprob=-0.5, cached=0, error=None):
    return RequestOutput(text, ids, num_prompt_tokens=4, num_output_tokens=0, finish_reason=finish, error=error,
                         num_cached_tokens=cached, logprobs=[TokenLogprobs(i, logprob, 1) for i in ids])


def builder(stream, outputs=EVERY_OUTPUT, n=1, echo=False, logprobs=0):
    request = GenerateRequest("Say:", SamplingParams(logprobs=0), n=n, stream=stream, echo_prompt=echo,
                              outputs=outputs, logprobs=logprobs)
    return ResponseBuilder(request, logprobs_text=lambda lps: f"{len(lps)} entries")


def test_a_stream_sends_each_output_as_it_comes_with_its_own_counts():
    responses = builder(stream=True)
    first = responses.add(0, output(" a", [5]))
    last = responses.add(0, output(" b c", [6, 7], finish="length", cached=2))
    assert not first.final and last.final
    assert first.values == {"text_output": [" a"], "finish_reason": ["None"], "cumulative_logprob": [-0.5],
                            "cum_log_probs": [-0.5], "logprobs": ["1 entries"], "num_input_tokens": [4],
                            "num_output_tokens": [1], "output_log_probs": [[-0.5]], "output_ids": [5],
                            "num_cached_tokens": [0]}
    assert last.values["text_output"] == [" b c"] and last.values["finish_reason"] == ["length"]
    assert last.values["num_output_tokens"] == [2] and last.values["output_ids"] == [6, 7]
    assert last.values["cumulative_logprob"] == [-1.5] and last.values["num_cached_tokens"] == [2]


def test_a_whole_response_comes_at_the_end_after_the_echoed_prompt():
    responses = builder(stream=False, echo=True)
    assert responses.add(0, output(" a", [5])) is None
    (response := responses.add(0, output(" b", [6], finish="stop")))
    assert response.final and response.values["text_output"] == ["Say: a b"]
    assert response.values["num_output_tokens"] == [2] and response.values["output_ids"] == [5, 6]
    assert response.values["logprobs"] == ["2 entries"] and response.values["finish_reason"] == ["stop"]


def test_only_the_outputs_asked_for_are_sent():
    response = builder(stream=False, outputs=frozenset()).add(0, output("x", [1], finish="length"))
    assert response.values == {"text_output": ["x"]}


def test_logprobs_are_null_when_the_sampling_parameters_did_not_ask():
    response = builder(stream=False, logprobs=None).add(0, output("x", [1], finish="length"))
    assert response.values["logprobs"] == ["null"]


def test_choices_stream_one_element_each_and_finish_together():
    outputs = frozenset({"finish_reason", "num_output_tokens"})
    responses = builder(stream=True, outputs=outputs, n=2)
    a = responses.add(1, output(" x", [3], finish="length"))
    b = responses.add(0, output(" y", [4]))
    c = responses.add(0, output(" z", [8], finish="stop"))
    assert a.values == {"text_output": ["", " x"], "finish_reason": ["None", "length"], "num_output_tokens": [0, 1]}
    assert not a.final and not b.final and c.final
    assert c.values == {"text_output": [" z", ""], "finish_reason": ["stop", "length"], "num_output_tokens": [1, 0]}


def test_whole_choices_each_carry_the_prompt_when_echoed():
    responses = builder(stream=False, outputs=frozenset(), n=2, echo=True)
    assert responses.add(0, output(" a", [1], finish="length")) is None
    assert responses.add(1, output(" b", [2], finish="length")).values == {"text_output": ["Say: a", "Say: b"]}


@pytest.mark.parametrize("stream", [True, False])
def test_a_final_output_without_tokens_still_ends_the_request(stream):
    responses = builder(stream=stream, outputs=frozenset({"num_output_tokens"}))
    responses.add(0, output(" a", [1]))
    last = responses.add(0, output("", [], finish="stop"))
    assert last.final and last.values["num_output_tokens"] == ([0] if stream else [1])


@pytest.mark.parametrize("stream", [True, False])
def test_nothing_follows_the_final_response(stream):
    responses = builder(stream=stream)
    assert responses.add(0, output(" a", [1], finish="length")).final and responses.ended
    assert responses.add(0, output(" b", [2], finish="length")) is None


def tagged(error: ErrorResponse) -> tuple:
    return (error.code, *split_error_status(error.message), error.outcome)


def test_a_cancelled_choice_ends_the_request_with_cancelled_and_its_siblings_send_nothing_more():
    responses = builder(stream=True, n=2)
    assert responses.add(1, output(" x", [3])) is not None
    error = responses.add(0, output(" y", [4], finish="cancelled"))
    assert tagged(error) == ("CANCELLED", "CANCELLED", "request cancelled", "cancelled")
    assert responses.ended
    assert responses.add(1, output(" z", [5], finish="length")) is None


@pytest.mark.parametrize("engine_died, status, code", [(False, "INTERNAL", "INTERNAL"),
                                                       (True, "UNAVAILABLE", "UNAVAILABLE")])
def test_a_failed_choice_is_unavailable_when_the_engine_died_under_it_else_internal(engine_died, status, code):
    responses = builder(stream=False)
    responses.add(0, output(" a", [1]))
    error = responses.add(0, output("", [], finish="error", error="boom"), engine_died=engine_died)
    assert tagged(error) == (code, status, "generation failed: boom", "error")


def test_a_choice_the_shared_engine_refused_ends_the_request_unavailable_as_a_full_queue():
    """A shared engine's queue bound ends a choice "overloaded" (backend/engine_core.py): answered as
    the front's own refusal is, UNAVAILABLE, and counted an overloaded outcome."""
    responses = builder(stream=True, n=2)
    error = responses.add(1, output("", [], finish="overloaded", error="2 requests are already waiting; retry later"))
    assert tagged(error) == ("UNAVAILABLE", "UNAVAILABLE", "2 requests are already waiting; retry later", "overloaded")
    assert responses.ended


def test_a_request_refused_while_its_choices_were_submitted_sends_nothing_for_those_already_queued():
    responses = builder(stream=True, n=2)
    responses.end()
    assert responses.add(0, output(" a", [1])) is None
    assert responses.add(0, output("", [], finish="cancelled")) is None


@pytest.mark.parametrize("error, code, status, outcome", [
    (ProtocolError("'top_p' must be in (0, 1]"), "INVALID_ARG", "INVALID_ARGUMENT", "invalid"),
    (InvalidRequestError("the prompt is empty"), "INVALID_ARG", "INVALID_ARGUMENT", "invalid"),
    (EngineOverloadedError("the queue is full"), "UNAVAILABLE", "UNAVAILABLE", "overloaded"),
])
def test_a_refused_request_gets_its_status_with_the_reason(error, code, status, outcome):
    assert tagged(refusal(error)) == (code, status, str(error), outcome)


def test_a_stream_that_asks_for_the_prompt_gets_the_vllm_backends_words_untagged():
    assert refusal(StreamEchoError(STREAM_ECHO_ERROR)) == ErrorResponse("INVALID_ARG", STREAM_ECHO_ERROR, "invalid")


def test_any_other_exception_is_no_refusal_but_a_failure_of_the_model():
    assert refusal(RecursionError("maximum recursion depth exceeded")) is None
    assert tagged(MODEL_FAILURE) == ("INTERNAL", "INTERNAL", "the model failed to process the request", "error")


def test_requests_meet_an_unhealthy_engine_and_a_shutdown_with_unavailable_and_cancelled():
    assert tagged(unhealthy_refusal("the engine process died")) == (
        "UNAVAILABLE", "UNAVAILABLE", "Model is unavailable due to unhealthy engine: the engine process died",
        "overloaded")
    assert tagged(SHUTTING_DOWN)[:3] == ("CANCELLED", "CANCELLED", "the model is shutting down")
