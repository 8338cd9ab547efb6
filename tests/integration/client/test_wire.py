"""Request tensors and response decoding, checked against the protocol tables (no server needed).

Responses are real `tritonclient.grpc.InferResult`s around real `ModelInferResponse` protobufs, i.e.
exactly what the gRPC stream hands the client."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

import gemma_protocol as protocol
from gemma_client import InvalidArgumentError, Logprob, TokenLogprobs
from gemma_client._wire import (FINAL_RESPONSE_PARAM, ResponseDecoder, build_inputs, build_request,
                                check_sampling, merge_headers, parse_logprobs)
from gemma_client.outputs import CompletionBuilder

SPECS = {spec.name: spec for spec in protocol.INPUTS + protocol.OUTPUTS}


def test_known_sampling_values_are_type_checked_and_normalised():
    checked = check_sampling(dict(max_tokens=8, temperature=0, top_p=1, stop=("a", "b"), seed=None))
    assert checked == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "stop": ["a", "b"]}
    assert isinstance(checked["temperature"], float)
    assert "seed" not in checked  # None: the server default applies


def test_values_convert_as_the_server_converts_them():
    # The protocol's rules (the vLLM backend's): the client sends what the server would have read.
    assert check_sampling(dict(max_tokens="8", top_p="0.5", stop="one string", ignore_eos=1, logprobs=2.0)) == \
        {"max_tokens": 8, "top_p": 0.5, "stop": ["one string"], "ignore_eos": True, "logprobs": 2}


@pytest.mark.parametrize("bad", [
    dict(max_tokens="eight"), dict(max_tokens=True), dict(max_tokens=8.5), dict(temperature="hot"),
    dict(stop=[1, 2]), dict(ignore_eos=2), dict(stop_token_ids=[1.5]), dict(logprobs=[1]),
])
def test_badly_typed_sampling_values_are_rejected_before_sending(bad):
    key = next(iter(bad))
    with pytest.raises(InvalidArgumentError, match=key):
        check_sampling(bad)


def test_unknown_sampling_keys_rejected_unless_not_strict():
    with pytest.raises(InvalidArgumentError, match="length_penalty") as info:
        check_sampling({"length_penalty": 0.5})
    assert isinstance(info.value, ValueError)
    assert "max_tokens" in str(info.value)  # the message lists the known keys
    assert check_sampling({"length_penalty": 0.5, "max_tokens": 3}, strict=False) == \
        {"length_penalty": 0.5, "max_tokens": 3}
    with pytest.raises(InvalidArgumentError):  # known keys are still checked
        check_sampling({"max_tokens": "three"}, strict=False)


def test_every_sampling_field_round_trips_through_the_server_parser():
    values = {int: 3, float: 0.5, bool: True, str: "x", dict: {"regex": "x"}}
    sampling = {f.key: ([values[f.kind]] if f.is_list else values[f.kind]) for f in protocol.SAMPLING_FIELDS}
    inputs = build_inputs("hi", check_sampling(sampling), stream=True)
    sent = next(i for i in inputs if i.name() == "sampling_parameters")
    text = sent._get_tensor()  # the protobuf tensor; its data travels in raw contents
    assert text.datatype == SPECS["sampling_parameters"].datatype
    raw = sent._get_content()
    parsed = protocol.parse_sampling_json(raw[4:].decode())  # 4-byte length prefix of a BYTES element
    assert parsed == {k: tuple(v) if isinstance(v, list) else v for k, v in sampling.items()}


def test_inputs_follow_the_protocol_table():
    inputs = build_inputs("Why is the sky blue? ☀", {"max_tokens": 4}, stream=False)
    by_name = {i.name(): i for i in inputs}
    flags = {"return_finish_reason", "return_num_input_tokens", "return_num_output_tokens", "return_output_ids"}
    assert set(by_name) == {"text_input", "stream", "exclude_input_in_output", "sampling_parameters"} | flags
    assert flags <= {flag.name for flag in protocol.RETURN_FLAGS}
    for name, tensor in by_name.items():
        spec = SPECS[name]
        assert tensor.datatype() == spec.datatype
        assert tensor.shape() == [1] and spec.dims == (1,)
    assert by_name["text_input"]._get_content()[4:].decode() == "Why is the sky blue? ☀"
    assert by_name["stream"]._get_content() == b"\x00"
    assert by_name["exclude_input_in_output"]._get_content() == b"\x01"  # never echo the prompt
    assert json.loads(by_name["sampling_parameters"]._get_content()[4:]) == {"max_tokens": 4}
    assert all(by_name[flag]._get_content() == b"\x01" for flag in flags)


def test_logprobs_and_cached_tokens_are_asked_for_only_when_wanted():
    def flags(sampling):
        return {i.name() for i in build_inputs("hi", sampling, stream=True) if i.name().startswith("return_")}

    assert "return_logprobs" not in flags({"max_tokens": 4})
    assert "return_logprobs" in flags({"logprobs": 0})
    assert "return_num_cached_tokens" not in flags({}) and \
        "return_num_cached_tokens" in {i.name() for i in build_inputs("hi", {}, stream=True, cached_tokens=True)}
    assert build_request("hi", {"logprobs": 3}, stream=True).num_top_logprobs == 3
    assert build_request("hi", {}, stream=True).num_top_logprobs is None


def test_prompt_must_be_text():
    with pytest.raises(InvalidArgumentError, match="prompt"):
        build_inputs(b"bytes", {}, stream=True)


def test_extra_headers_pass_through_and_the_grpc_error_header_is_opt_in():
    assert merge_headers({"authorization": "Bearer a"}, {"x-request": "1"}, None) == \
        {"authorization": "Bearer a", "x-request": "1"}
    assert merge_headers({"a": "1"}, grpc_error_status=True) == {"triton_grpc_error": "true", "a": "1"}


def response(final: bool = False, **outputs) -> InferResult:
    """A ModelInferResponse as Triton sends it: tensors in raw_output_contents."""
    message = service_pb2.ModelInferResponse(model_name="gemma")
    for name, value in outputs.items():
        spec = SPECS[name]
        if spec.datatype == "BYTES":
            array = np.array(value, dtype=np.object_)
            raw = serialize_byte_tensor(array).item()
        else:
            array = np.array(value, dtype={"INT32": np.int32, "UINT32": np.uint32}[spec.datatype])
            raw = array.tobytes()
        tensor = message.outputs.add(name=name, datatype=spec.datatype)
        tensor.shape.extend(array.shape)
        message.raw_output_contents.append(raw)
    if final:
        message.parameters[FINAL_RESPONSE_PARAM].bool_param = True
    return InferResult(message)


def test_full_response_decodes_every_output():
    decoder = ResponseDecoder()
    delta, final = decoder.decode(response(
        text_output=[b"Hello"], finish_reason=[b"None"], num_input_tokens=[5], num_output_tokens=[2],
        output_ids=[10, 11], num_cached_tokens=[0]))
    assert not final
    assert (delta.text, delta.token_ids, delta.finish_reason) == ("Hello", (10, 11), None)  # "None": not yet
    assert (delta.num_input_tokens, delta.num_output_tokens, delta.num_cached_tokens) == (5, 2, 0)


def test_token_counts_are_per_response_and_a_completion_sums_them():
    decoder, builder = ResponseDecoder(), CompletionBuilder()
    for ids, reason, final in (([1, 2], b"None", False), ([3], b"None", False), ([4, 5, 6], b"length", True)):
        delta, _ = decoder.decode(response(final, text_output=[b"x"], finish_reason=[reason], num_input_tokens=[7],
                                           num_output_tokens=[len(ids)], output_ids=ids, num_cached_tokens=[16]))
        builder.add(delta)
    completion = builder.build()
    assert completion.token_ids == (1, 2, 3, 4, 5, 6) and completion.num_output_tokens == 6
    assert (completion.finish_reason, completion.num_input_tokens, completion.num_cached_tokens) == ("length", 7, 16)


def test_optional_outputs_may_be_missing():
    delta, final = ResponseDecoder().decode(response(final=True, text_output=[b"just text"]))
    assert final and delta.text == "just text"
    assert delta.token_ids == () and delta.finish_reason is None
    assert delta.num_input_tokens is None and delta.num_output_tokens is None


def test_empty_final_response_is_no_delta():
    assert ResponseDecoder().decode(response(final=True)) == (None, True)


def test_finish_reason_on_last_delta():
    delta, final = ResponseDecoder().decode(response(final=True, text_output=[b""], finish_reason=[b"length"]))
    assert final and delta.text == "" and delta.finish_reason == "length"


def test_character_split_across_responses_is_reassembled():
    data = "naïve ☀ 日本".encode()
    decoder = ResponseDecoder()
    pieces = [data[:3], data[3:9], data[9:]]  # splits inside "ï" and inside "☀"
    texts = [decoder.decode(response(text_output=[p]))[0] for p in pieces[:-1]]
    last, _ = decoder.decode(response(final=True, text_output=[pieces[-1]]))
    assert "".join(d.text for d in texts if d is not None) + last.text == "naïve ☀ 日本"


# The vLLM backend's `logprobs` layout, as vLLM's Logprob dicts serialise: per token, the sampled
# token first, then the top `logprobs` alternatives by rank (the sampled one once).
VLLM_LOGPROBS = json.dumps([
    {"42": {"logprob": -0.25, "rank": 1, "decoded_token": " fox"},        # sampled = the top-1
     "7": {"logprob": -1.75, "rank": 2, "decoded_token": " dog"}},
    {"9": {"logprob": -3.5, "rank": 4, "decoded_token": " jumps"},        # sampled outside the top 2
     "11": {"logprob": -0.5, "rank": 1, "decoded_token": " ran"},
     "12": {"logprob": -1.0, "rank": 2, "decoded_token": " sat"}},
    {"13": {"logprob": -0.1, "rank": 2, "decoded_token": " over"},        # sampled second of the top 2
     "14": {"logprob": -0.05, "rank": 1, "decoded_token": " under"}},
])


def test_vllm_layout_logprobs_parse_into_token_logprobs_best_first():
    fox, jumps, over = parse_logprobs(VLLM_LOGPROBS, 2)
    assert fox == TokenLogprobs(42, " fox", -0.25, (Logprob(42, " fox", -0.25), Logprob(7, " dog", -1.75)), rank=1)
    assert (jumps.token_id, jumps.token, jumps.logprob, jumps.rank) == (9, " jumps", -3.5, 4)
    assert jumps.top_logprobs == (Logprob(11, " ran", -0.5), Logprob(12, " sat", -1.0))
    assert [t.token_id for t in over.top_logprobs] == [14, 13] and over.rank == 2


def test_logprobs_need_the_requested_count_to_tell_the_top_ones():
    # Token 13 (rank 2) and its better rival: with 1 alternative asked for, 13 is only the sampled token.
    *_, over = parse_logprobs(VLLM_LOGPROBS, 1)
    assert over.token_id == 13 and over.top_logprobs == (Logprob(14, " under", -0.05),)
    assert all(lp.top_logprobs == () for lp in parse_logprobs(VLLM_LOGPROBS, 0))
    assert parse_logprobs("null", 2) is None
    assert parse_logprobs("[]", 2) == ()


def test_logprobs_are_decoded_only_when_the_request_asked_for_them():
    sent = response(text_output=[b" fox jumps over"], logprobs=[VLLM_LOGPROBS.encode()])
    assert ResponseDecoder().decode(sent)[0].logprobs is None  # a server that sends outputs unasked
    assert len(ResponseDecoder(2).decode(sent)[0].logprobs) == 3
    assert ResponseDecoder(2).decode(response(text_output=[b"x"], logprobs=[b"null"]))[0].logprobs is None
