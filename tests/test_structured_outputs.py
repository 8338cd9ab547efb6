"""Structured outputs in the engine (backend/grammar.py), on the real Gemma 3 270M: each constraint
kind produces text that satisfies it, bad constraints end their own request "invalid" naming the
field, and the constraint holds under preemption, async scheduling, n > 1, seeds and logprobs."""
import json
import re
import threading

import jsonschema
import pytest

from backend.errors import InvalidRequestError
import torch

from backend.grammar import Grammar, GrammarCompiler, _closed_objects, _unpacked, mask_logits
from backend.loader import start_engine
from backend.params import EngineConfig, SamplingParams, StructuredOutputs

pytestmark = pytest.mark.slow

BOOK = {"type": "object", "additionalProperties": False, "required": ["title", "year", "genres"],
        "properties": {"title": {"type": "string", "maxLength": 40},
                       "year": {"type": "integer", "minimum": 1800, "maximum": 2030},
                       "genres": {"type": "array", "maxItems": 3,
                                  "items": {"enum": ["fiction", "poetry", "history"]}}}}
BOOK_PROMPT = "A JSON record of a famous novel:\n"


def outside_strings(text: str) -> str:
    """A JSON text without its string literals: what the grammar's whitespace rules govern."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)


def constrained(constraint, max_tokens=64, **sampling) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=sampling.pop("temperature", 0),
                          structured_outputs=constraint, **sampling)


@pytest.fixture(scope="module")
def engine(default_checkpoint):
    eng = start_engine(EngineConfig(checkpoint=str(default_checkpoint), device="cpu"))
    yield eng
    eng.shutdown()


# --- the constraint's shape (no engine) -----------------------------------------------------------

@pytest.mark.parametrize("obj, message", [
    ({}, "exactly one of"), ({"json": {}, "regex": "a"}, "got json, regex"),
    ({"json": "{not json"}, "'structured_outputs.json' is not valid JSON"),
    ({"json": "[1]"}, "must be a JSON schema"), ({"regex": 5}, "'structured_outputs.regex' must be a string"),
    ({"choice": []}, "'structured_outputs.choice' must hold 1 to"), ({"choice": ["a", ""]}, "non-empty strings"),
    ({"structural_tag": "{}"}, "structural_tag' is not supported"), ({"jsn": {}}, "unknown key(s) ['jsn']"),
])
def test_a_malformed_constraint_is_refused_naming_the_field(obj, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        SamplingParams(structured_outputs=obj)


def test_a_schema_keeps_its_key_order_and_vllm_backend_keys_are_accepted():
    params = SamplingParams(structured_outputs={"json": {"b": 1, "a": 2}, "backend": "xgrammar",
                                                "disable_fallback": True})
    assert params.structured_outputs == StructuredOutputs(json='{"b": 1, "a": 2}')
    assert params.structured_outputs.kind == "json"


def test_disable_additional_properties_closes_every_object_that_does_not_say_otherwise():
    schema = {"type": "object", "properties": {"inner": {"type": "object", "properties": {"x": {}}},
                                                "open": {"type": "object", "additionalProperties": True}}}
    closed = _closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True


def test_the_bitmask_unpacks_to_one_bool_per_token_in_order():
    words = torch.tensor([[0b101, -1], [-(1 << 31), 0]], dtype=torch.int32)  # bit k of word w: token 32w + k
    allowed = _unpacked(words, torch.device("cpu"))
    assert allowed.shape == (2, 64)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2] + list(range(32, 64))
    assert allowed[1].nonzero().flatten().tolist() == [31]


def test_every_end_id_may_end_a_complete_grammar_and_none_an_incomplete_one(default_checkpoint):
    compiler = GrammarCompiler(default_checkpoint / "tokenizer.json", 262144, eos_token_ids=frozenset({1, 106}),
                               on_done=lambda: None)
    try:
        compiled = compiler.compile(StructuredOutputs(regex="[0-9]+"), timeout_s=60).result(timeout=60)
        grammar = Grammar(compiled, frozenset({1, 106, 7}))
    finally:
        compiler.shutdown()
    logits = torch.zeros(2, 262144)
    mask_logits(logits, [grammar, None])
    assert torch.isinf(logits[0, [1, 106, 7]]).all() and torch.isfinite(logits[1]).all()  # nothing generated yet
    assert grammar.accept(236770) is None  # "1"
    logits = torch.zeros(1, 262144)
    mask_logits(logits, [grammar])
    assert torch.isfinite(logits[0, [1, 106, 7, 236770]]).all()


# --- generation -----------------------------------------------------------------------------------

def test_each_constraint_kind_is_satisfied(engine):
    cases = [
        (BOOK_PROMPT, {"json": BOOK}, lambda text: jsonschema.validate(json.loads(text), BOOK)),
        (BOOK_PROMPT, {"json": BOOK, "disable_any_whitespace": True},
         lambda text: (jsonschema.validate(json.loads(text), BOOK), outside_strings(text).strip() == "".join(
             outside_strings(text).split()) or pytest.fail(text))),
        (BOOK_PROMPT, {"json": BOOK, "whitespace_pattern": " ?"},  # vLLM's option: one space at most
         lambda text: (jsonschema.validate(json.loads(text), BOOK), "\n" not in text and "  " not in
                       outside_strings(text) or pytest.fail(text))),
        ("Some JSON:", {"json_object": True}, lambda text: isinstance(json.loads(text), dict) or pytest.fail(text)),
        ("Today's date in ISO format is ", {"regex": r"\d{4}-\d{2}-\d{2}"},
         lambda text: re.fullmatch(r"\d{4}-\d{2}-\d{2}", text) or pytest.fail(text)),
        ("Is the sky blue? Answer:", {"choice": ["yes", "no", "it depends"]},
         lambda text: text in ("yes", "no", "it depends") or pytest.fail(text)),
        ("Greeting:", {"grammar": 'start: "hello " NAME "!"\nNAME: /[a-z]{1,8}/'},
         lambda text: re.fullmatch(r"hello [a-z]{1,8}!", text) or pytest.fail(text)),
        ("Answer:", {"grammar": 'root ::= "yes" | "no"'},  # GBNF, as vLLM's default backend reads
         lambda text: text in ("yes", "no") or pytest.fail(text)),
    ]
    handles = [engine.submit(prompt, constrained(obj)) for prompt, obj, _ in cases]
    for (prompt, obj, check), handle in zip(cases, handles):
        out = handle.result()
        assert out.finish_reason == "stop", (obj, out)
        check(out.text)
    assert engine.stats().kv_cache.used_blocks == 0


def test_sampled_outputs_validate_and_a_seed_reproduces_them(engine):
    params = constrained({"json": BOOK}, max_tokens=96, temperature=0.9, seed=7)
    first, again = (engine.submit(BOOK_PROMPT, params).result() for _ in range(2))
    assert first.token_ids == again.token_ids
    for seed in range(4):
        out = engine.submit(BOOK_PROMPT, constrained({"json": BOOK}, max_tokens=96, temperature=0.9,
                                                     seed=seed)).result()
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), BOOK)
        else:  # cut by max_tokens: a prefix of a valid document
            assert out.finish_reason == "length" and out.num_output_tokens == 96


def test_logprobs_come_from_the_masked_distribution(engine):
    out = engine.submit("Is the sky blue? Answer:", constrained({"choice": ["yes", "no"]}, logprobs=5)).result()
    first = out.logprobs[0]
    finite = [token for token, logprob in zip(first.top_ids, first.top_logprobs) if logprob > float("-inf")]
    assert len(finite) >= 2 and first.rank == 1
    for token in finite:  # every token the mask lets through starts one of the choices
        assert any(word.startswith(engine.tokenizer.decode([token])) for word in ("yes", "no")), token
    assert abs(sum(2.718281828 ** lp for lp in first.top_logprobs if lp > float("-inf")) - 1) < 0.05


def test_a_constraint_that_cannot_finish_within_max_tokens_ends_length(engine):
    out = engine.submit(BOOK_PROMPT, constrained({"json": BOOK}, max_tokens=4)).result()
    assert (out.finish_reason, out.num_output_tokens) == ("length", 4)


@pytest.mark.parametrize("obj, field, library_words", [
    ({"regex": "a(b"}, "structured_outputs.regex", "unclosed group"),
    ({"json": {"type": "nope"}}, "structured_outputs.json", "nope"),
    ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar", "undefined_rule"),
    ({"grammar": "root ::= ("}, "structured_outputs.grammar", "GBNF"),
])
def test_an_invalid_constraint_ends_its_request_invalid_and_the_others_go_on(engine, obj, field, library_words):
    plain = engine.submit("The capital of France is", SamplingParams(max_tokens=6, temperature=0))
    bad = engine.submit("Bad:", constrained(obj)).result()
    assert bad.finish_reason == "invalid" and bad.token_ids == []
    assert f"'{field}'" in bad.error and library_words in bad.error
    assert plain.result().finish_reason == "length"


def test_a_constraint_that_does_not_compile_in_time_fails_alone(default_checkpoint, monkeypatch):
    """A compile slower than grammar_compile_timeout_s (made slow here: llguidance compiles our
    constraints in milliseconds) fails its request only; the clock starts once the tokenizer's index
    exists, so the first constrained request after a start does not pay for building it."""
    import time

    import backend.grammar

    compile_grammar = backend.grammar.grammar_text

    def slow_for_one_regex(constraint):
        if constraint.regex == "[a-z]+ slow":
            time.sleep(3)
        return compile_grammar(constraint)

    monkeypatch.setattr(backend.grammar, "grammar_text", slow_for_one_regex)
    eng = start_engine(EngineConfig(checkpoint=str(default_checkpoint), device="cpu", grammar_compile_timeout_s=1))
    try:
        plain = eng.submit("The capital of France is", SamplingParams(max_tokens=6, temperature=0))
        quick = eng.submit("Answer:", constrained({"choice": ["yes", "no"]}))  # waits for the tokenizer (~2 s)
        late = eng.submit("Bad:", constrained({"regex": "[a-z]+ slow"})).result()
        assert late.finish_reason == "invalid"
        assert "did not compile within 1 s (grammar_compile_timeout_s)" in late.error
        assert quick.result().finish_reason == "stop" and plain.result().finish_reason == "length"
        assert eng.stats().num_waiting == 0
    finally:
        eng.shutdown()


def test_a_request_cancelled_while_its_grammar_compiles_ends_cancelled(default_checkpoint):
    eng = start_engine(EngineConfig(checkpoint=str(default_checkpoint), device="cpu"))
    try:
        handle = eng.submit(BOOK_PROMPT, constrained({"json": BOOK}))  # the first compile waits for the tokenizer
        handle.cancel()
        assert handle.result().finish_reason == "cancelled"
        out = eng.submit(BOOK_PROMPT, constrained({"json": BOOK})).result()
        assert out.finish_reason == "stop"
        assert eng.stats().num_waiting == 0 and eng.stats().kv_cache.used_blocks == 0
    finally:
        eng.shutdown()


def test_preemption_async_scheduling_and_an_engine_process_keep_the_output(default_checkpoint, engine):
    """Outputs equal the plain engine's: with a cache so small that sequences are preempted and
    recomputed, with the next step launched before the tokens are back, and in an engine process."""
    prompts = [BOOK_PROMPT, "A JSON record of a poem:\n", "A JSON record of a history book:\n"]
    params = constrained({"json": BOOK}, max_tokens=32)
    expected = [engine.submit(p, params).result() for p in prompts]
    configs = [dict(kv_cache_bytes=5 * 16 * 2 * 18 * 256 * 4, max_num_seqs=3),  # 5 blocks of 16 tokens
               dict(async_scheduling="on")]
    for extra in configs:
        eng = start_engine(EngineConfig(checkpoint=str(default_checkpoint), device="cpu", **extra))
        try:
            got = [h.result() for h in [eng.submit(p, params) for p in prompts]]
            if "kv_cache_bytes" in extra:
                assert eng.stats().num_preemptions > 0
        finally:
            eng.shutdown()
        assert [o.token_ids for o in got] == [o.token_ids for o in expected], extra
    eng = start_engine(EngineConfig(checkpoint=str(default_checkpoint), device="cpu"), engine_process=True)
    try:
        assert eng.submit(prompts[0], params).result().token_ids == expected[0].token_ids
        bad = eng.submit("Bad:", constrained({"regex": "a(b"})).result()
        assert bad.finish_reason == "invalid" and "structured_outputs.regex" in bad.error
    finally:
        eng.shutdown()


def test_concurrent_constrained_and_plain_requests_share_the_batch(engine):
    results = {}

    def run(name, prompt, params):
        results[name] = engine.submit(prompt, params).result()

    threads = [threading.Thread(target=run, args=(f"json{i}", BOOK_PROMPT, constrained({"json": BOOK})))
               for i in range(3)]
    threads += [threading.Thread(target=run, args=("plain", "The capital of France is",
                                                   SamplingParams(max_tokens=8, temperature=0)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({results[f"json{i}"].text for i in range(3)}) == 1  # same prompt, greedy: same text
    jsonschema.validate(json.loads(results["json0"].text), BOOK)
    plain = engine.submit("The capital of France is", SamplingParams(max_tokens=8, temperature=0)).result()
    assert results["plain"].token_ids == plain.token_ids  # the masks touched only the constrained rows
