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
from gemma_client import InvalidArgumentError
from gemma_client._wire import (FINAL_RESPONSE_PARAM, ResponseDecoder, build_inputs, check_sampling,
                                merge_headers)

SPECS = {spec.name: spec for spec in protocol.INPUTS + protocol.OUTPUTS}


def test_known_sampling_values_are_type_checked_and_normalised():
    checked = check_sampling(dict(max_tokens=8, temperature=0, top_p=1, stop=("a", "b"), seed=None))
    assert checked == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "stop": ["a", "b"]}
    assert isinstance(checked["temperature"], float)
    assert "seed" not in checked  # None: the server default applies


@pytest.mark.parametrize("bad", [
    dict(max_tokens="8"), dict(max_tokens=True), dict(max_tokens=8.0), dict(temperature="hot"),
    dict(stop="single string"), dict(stop=[1, 2]), dict(ignore_eos=1), dict(stop_token_ids=[1.5]),
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
        check_sampling({"max_tokens": "3"}, strict=False)


def test_every_sampling_field_round_trips_through_the_server_parser():
    values = {int: 3, float: 0.5, bool: True, str: "x"}
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
    assert set(by_name) == {"text_input", "stream", "exclude_input_in_output", "sampling_parameters"}
    for name, tensor in by_name.items():
        spec = SPECS[name]
        assert tensor.datatype() == spec.datatype
        assert tensor.shape() == [1] and spec.dims == (1,)
    assert by_name["text_input"]._get_content()[4:].decode() == "Why is the sky blue? ☀"
    assert by_name["stream"]._get_content() == b"\x00"
    assert by_name["exclude_input_in_output"]._get_content() == b"\x01"  # never echo the prompt
    assert json.loads(by_name["sampling_parameters"]._get_content()[4:]) == {"max_tokens": 4}


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
        text_output=[b"Hello"], finish_reason=[b""], num_input_tokens=[5], num_output_tokens=[2],
        output_ids=[10, 11]))
    assert not final
    assert (delta.text, delta.token_ids, delta.finish_reason) == ("Hello", (10, 11), None)
    assert (delta.num_input_tokens, delta.num_output_tokens) == (5, 2)


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
