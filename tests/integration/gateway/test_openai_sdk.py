"""The gateway through the official `openai` SDK: completions and chat, streamed and not, n, seeds,
stop strings and usage, checked against what the gRPC client gets from the same server."""
from __future__ import annotations

import pytest
from gemma_client import GemmaClient
from gemma_client.chat import END_OF_TURN, Conversation

from gateway.sampling import choice_seeds

from tests.support.gateway import GREEDY
from tests.support.server import MODEL

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What colour is the sky?"}]


@pytest.fixture(scope="module")
def grpc(server):
    return GemmaClient(server.grpc_url)


def chat_reference(grpc, max_tokens: int, **sampling):
    """The same chat through the gRPC client: Gemma turns (system message in the first user turn),
    generation stopped at the end of the model's turn."""
    conversation = Conversation(system=MESSAGES[0]["content"])
    conversation.add_user(MESSAGES[1]["content"])
    return grpc.generate(conversation.render(), max_tokens=max_tokens, stop=[END_OF_TURN], **(sampling or GREEDY))


def counts(usage) -> tuple[int, int, int]:
    """The token counts, which a repeated request shares (its cached tokens may differ)."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def test_models_lists_the_served_model(sdk):
    assert [m.id for m in sdk.models.list()] == [MODEL]
    assert sdk.models.retrieve(MODEL).id == MODEL


def test_greedy_completion_equals_the_grpc_client(sdk, grpc):
    expected = grpc.generate(PROMPT, max_tokens=12, **GREEDY)
    completion = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **GREEDY)
    (choice,) = completion.choices
    assert completion.object == "text_completion" and completion.model == MODEL
    assert choice.text == expected.text and choice.index == 0
    assert choice.finish_reason == expected.finish_reason
    assert completion.usage.prompt_tokens == expected.num_input_tokens
    assert completion.usage.completion_tokens == expected.num_output_tokens
    assert completion.usage.total_tokens == expected.num_input_tokens + expected.num_output_tokens
    assert 0 <= completion.usage.prompt_tokens_details.cached_tokens < completion.usage.prompt_tokens


def test_streamed_completion_equals_the_whole_one(sdk):
    whole = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, **GREEDY)
    chunks = list(sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert usage_chunk.choices == [] and counts(usage_chunk.usage) == counts(whole.usage)


def test_greedy_chat_equals_the_grpc_client_with_gemma_turns(sdk, grpc):
    expected = chat_reference(grpc, max_tokens=10)
    chat = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10, **GREEDY)
    (choice,) = chat.choices
    assert chat.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == \
        (expected.num_input_tokens, expected.num_output_tokens)


def test_streamed_chat_equals_the_whole_one(sdk):
    whole = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, **GREEDY)
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(whole.usage)


def test_ignore_eos_gives_exactly_max_tokens_as_the_grpc_client_does(sdk, grpc):
    # vLLM's extension field, which the SDK sends as an extra body field.
    ignore_eos = dict(extra_body={"ignore_eos": True}, **GREEDY)
    expected = grpc.generate(PROMPT, max_tokens=20, ignore_eos=True, **GREEDY)
    completion = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, **ignore_eos)
    assert completion.choices[0].text == expected.text
    assert (completion.usage.completion_tokens, completion.choices[0].finish_reason) == (20, "length")
    chunks = list(sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, stream=True,
                                         stream_options={"include_usage": True}, **ignore_eos))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == expected.text
    assert chunks[-1].usage.completion_tokens == 20
    chat = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, **ignore_eos)
    assert (chat.usage.completion_tokens, chat.choices[0].finish_reason) == (20, "length")
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, stream=True,
                                              stream_options={"include_usage": True}, **ignore_eos))
    assert chunks[-1].usage.completion_tokens == 20


def test_seed_reproduces_and_n_gives_distinct_choices(sdk):
    def sample(seed, n=1, stream=False):
        args = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed, n=n)
        if not stream:
            return [c.text for c in sorted(sdk.completions.create(**args).choices, key=lambda c: c.index)]
        texts = [""] * n
        for chunk in sdk.completions.create(stream=True, **args):
            for c in chunk.choices:
                texts[c.index] += c.text
        return texts

    two = sample(7, n=2)
    assert len(two) == 2 and two[0] != two[1]          # each choice its own sample
    assert sample(7, n=2) == two                       # a seed reproduces every choice
    assert sample(7, n=2, stream=True) == two          # streamed or not
    assert sample(7) == two[:1]                        # choice 0 uses the seed itself
    assert sample(8) != two[:1]


def test_n_chat_choices_are_samples_with_the_derived_seeds(sdk, grpc):
    chat = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=3, seed=1)
    expected = [chat_reference(grpc, max_tokens=6, temperature=1.0, seed=seed) for seed in choice_seeds(1, 3)]
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert [c.message.content for c in chat.choices] == [e.text for e in expected]
    assert chat.usage.prompt_tokens == expected[0].num_input_tokens  # the prompt counts once
    assert chat.usage.completion_tokens == sum(e.num_output_tokens for e in expected)


@pytest.mark.parametrize("as_list", [False, True], ids=["string", "list"])
def test_stop_strings_cut_the_text(sdk, as_list):
    greedy = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, **GREEDY).choices[0].text
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    assert stop.strip(), f"no usable stop string in {greedy!r}"
    stopped = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, stop=[stop] if as_list else stop,
                                     **GREEDY).choices[0]
    assert stopped.text == greedy[:greedy.index(stop)]
    assert stopped.finish_reason == "stop"


def test_a_list_of_prompts_gets_n_choices_each(sdk, grpc):
    prompts = [PROMPT, "Once upon a time"]
    completion = sdk.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2, **GREEDY)
    texts = {c.index: c.text for c in completion.choices}
    expected = [grpc.generate(p, max_tokens=6, **GREEDY).text for p in prompts]
    assert texts == {0: expected[0], 1: expected[0], 2: expected[1], 3: expected[1]}


def test_chat_logprobs_and_top_logprobs_streamed_or_not(sdk, grpc):
    expected = chat_reference(grpc, max_tokens=8, temperature=0.0, logprobs=3)
    chat = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3,
                                       **GREEDY)
    content = chat.choices[0].logprobs.content
    assert [t.logprob for t in content] == [lp.logprob for lp in expected.logprobs]
    assert [t.token for t in content] == [lp.token for lp in expected.logprobs]
    for token in content:
        assert token.bytes == list(token.token.encode("utf-8"))
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token  # greedy: the top-1
        assert token.top_logprobs[0].logprob == token.logprob
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True,
                                              top_logprobs=3, stream=True, **GREEDY))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]
    bare = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True, **GREEDY)
    assert all(t.top_logprobs == [] for t in bare.choices[0].logprobs.content)
    plain = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_shape(sdk, grpc):
    expected = grpc.generate(PROMPT, max_tokens=6, logprobs=2, **GREEDY)
    completion = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=2, **GREEDY)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == [lp.token for lp in expected.logprobs]
    assert logprobs.token_logprobs == [lp.logprob for lp in expected.logprobs]
    assert logprobs.top_logprobs == [{t.token: t.logprob for t in lp.top_logprobs} for lp in expected.logprobs]
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    # The sum of the tokens' logprobs is the completion's log-likelihood under the model.
    assert sum(logprobs.token_logprobs) == pytest.approx(sum(lp.logprob for lp in expected.logprobs))
    chunks = list(sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=2, stream=True,
                                         **GREEDY))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == logprobs.tokens
    assert [o for lp in streamed for o in lp.text_offset] == logprobs.text_offset


def test_penalties_change_the_output(sdk):
    def complete(**penalties):
        return sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, seed=5, **GREEDY,
                                      **penalties).choices[0].text

    plain = complete()
    assert complete(frequency_penalty=2.0) != plain
    assert complete(presence_penalty=2.0) != plain
    assert complete(presence_penalty=0.0, frequency_penalty=0) == plain


def test_a_repeated_long_prompt_reports_cached_tokens(sdk):
    """vLLM's usage.prompt_tokens_details.cached_tokens: prompt tokens the server's prefix cache held."""
    prompt = " ".join(f"Item {i} is a word." for i in range(30))  # several 16-token KV blocks

    def usage(create, stream, **args):
        if not stream:
            return create(**args).usage
        return list(create(stream=True, stream_options={"include_usage": True}, **args))[-1].usage

    endpoints = ((sdk.completions.create, dict(prompt=prompt)),
                 (sdk.chat.completions.create, dict(messages=[{"role": "user", "content": prompt}])))
    for create, args in endpoints:
        args = dict(model=MODEL, max_tokens=2, **GREEDY, **args)
        first = usage(create, False, **args)  # its prompt's blocks are in the cache from now on
        for stream in (False, True):
            again = usage(create, stream, **args)
            assert 0 < again.prompt_tokens_details.cached_tokens < again.prompt_tokens == first.prompt_tokens


def test_without_max_tokens_a_completion_gets_16_and_a_chat_the_rest_of_the_context(sdk, tiny_server):
    """OpenAI's and vLLM's defaults (the tiny server's context is 512 tokens)."""
    ignore_eos = {"extra_body": {"ignore_eos": True}, "temperature": 0}
    completion = sdk.completions.create(model=MODEL, prompt=PROMPT, **ignore_eos)
    assert completion.usage.completion_tokens == 16
    chat = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, **ignore_eos)
    assert chat.choices[0].finish_reason == "length" and chat.usage.total_tokens == 512
