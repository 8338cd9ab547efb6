"""OutputProcessor: token deltas -> text on the reader's side, whatever the deltas' grouping."""
import pytest

from backend.outputs import OutputProcessor, TokenDelta
from backend.params import SamplingParams
from backend.tokenizer import Tokenizer

TEXT = "Grüße aus Köln! 東京タワー 🚀 is tall, and the café is open."


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint):
    return Tokenizer(default_checkpoint)


def run(tokenizer, ids, groups, params, finish="length"):
    """Feed `ids` as deltas of the given sizes (the last one finishing) and poll after each group."""
    processor = OutputProcessor(tokenizer, tokenizer.encode("Say:"), params)
    outs, at = [], 0
    for n in groups:
        chunk = ids[at:at + n]
        at += n
        last = at >= len(ids)
        deltas = [TokenDelta([t]) for t in chunk[:-1]] + [TokenDelta(chunk[-1:], finish if last else None)]
        out = processor.process(deltas)
        if out is not None:
            outs.append(out)
    return outs


@pytest.mark.parametrize("size", [1, 3, None], ids=["per-token", "threes", "all-at-once"])
def test_any_grouping_gives_the_same_text_and_ids(tokenizer, size):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    size = size or len(ids)
    outs = run(tokenizer, ids, [size] * -(-len(ids) // size), SamplingParams(max_tokens=100))
    assert "".join(o.text for o in outs) == TEXT
    assert [t for o in outs for t in o.token_ids] == ids
    assert all(o.text for o in outs)  # tokens of an unfinished character wait for the rest of it
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == len(ids)


def test_a_stop_id_ends_the_output_without_text(tokenizer):
    ids = tokenizer.encode("Hello world", add_special_tokens=False) + [1]  # <eos>
    outs = run(tokenizer, ids, [len(ids)], SamplingParams(max_tokens=100), finish="stop")
    assert outs[-1].text == "Hello world" and outs[-1].token_ids == ids and outs[-1].finish_reason == "stop"


@pytest.mark.parametrize("stop", ["tall", "s ta"], ids=["in-one-token", "across-tokens"])
def test_a_stop_string_cuts_the_text_and_the_tokens_in_any_grouping(tokenizer, stop):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = [tokenizer.decode(ids[:i + 1]) for i in range(len(ids))]
    if stop == "s ta":  # " is" and " tall" are two tokens: the stop begins in one and ends in the next
        first = next(i for i, text in enumerate(pieces) if "s ta" in text)
        assert "s t" not in pieces[first - 1] and pieces[first - 1].endswith("s")
    for size in (1, len(ids)):
        outs = run(tokenizer, ids, [size] * -(-len(ids) // size), SamplingParams(max_tokens=100, stop=(stop,)))
        assert "".join(o.text for o in outs) == TEXT[:TEXT.index(stop)]
        assert outs[-1].finish_reason == "stop"
        n = outs[-1].num_output_tokens  # up to the token that completed the stop string
        assert stop in pieces[n - 1] and stop not in pieces[n - 2]
