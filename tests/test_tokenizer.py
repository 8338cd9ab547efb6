"""Tokenizer, Gemma chat format and TextStream (incremental detokenizer with stop strings).

Fast tests use a tiny Gemma-like tokenizer built here: Unigram pieces with byte fallback, so
characters outside its vocabulary (CJK, most emoji, some accents) arrive one byte token at a time,
exactly the partial-character case of the real Gemma vocabulary. Slow tests use the real one.
"""
import json

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from backend.errors import InvalidRequestError
from backend.tokenizer import TextStream, Tokenizer, gemma_chat_prompt

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PIECES = [*"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:'\n-", "▁",
          "é", "😀", "▁the", "▁Hello", "▁world", "ing", "▁STOP", "END"]
MULTILINGUAL = ["Hello world, the café is open.", "naïve señor: 世界 こんにちは", "emoji 😀🫨👍🏽 and ❤️ done",
                "mixed é😀世 end", " leading and trailing spaces "]


def save_tiny_tokenizer(directory, chat_template=None):
    # Byte tokens and specials score 0; longer pieces score higher, so known words stay whole.
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    vocab += [(piece, 2.0 * len(piece) - len(PIECES)) for piece in PIECES]
    raw = RawTokenizer(models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=True))
    raw.normalizer = normalizers.Replace(" ", "▁")  # Gemma's normalizer and decoder
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    raw.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    raw.add_special_tokens(SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>",
                                 unk_token="<unk>", pad_token="<pad>")
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tokenizer(save_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer")))


def stream_all(tokenizer, ids, stop=(), prompt_ids=(), min_tokens=0):
    stream = TextStream(tokenizer, list(prompt_ids), stop=stop, min_tokens=min_tokens)
    deltas = [stream.push(t) for t in ids]
    deltas.append(stream.finish())
    return deltas, stream


def output_ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# --- Tokenizer ----------------------------------------------------------------------------------

def test_encode_prepends_bos_and_decode_round_trips(tiny):
    ids = tiny.encode("Hello world")
    assert ids[0] == tiny.bos_token_id == 2
    assert tiny.decode(ids) == "Hello world"
    assert tiny.decode(ids, skip_special_tokens=False) == "<bos>Hello world"
    assert tiny.vocab_size == len(tiny.hf_tokenizer)


def test_eos_ids_come_from_generation_config(tmp_path):
    save_tiny_tokenizer(tmp_path)
    assert Tokenizer(tmp_path).eos_token_ids == frozenset({1})  # no generation config: the tokenizer's
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    assert Tokenizer(tmp_path).eos_token_ids == frozenset({1, 5})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer(tmp_path).eos_token_ids == frozenset({5})


# --- chat format --------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hi there "},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]
GEMMA_CONVERSATION = (
    "<bos><start_of_turn>user\nAnswer briefly.\n\nHi there<end_of_turn>\n"
    "<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
    "<start_of_turn>model\n"
)


def test_builtin_gemma_template_when_the_tokenizer_has_none(tiny):
    assert not tiny.hf_tokenizer.chat_template
    assert tiny.apply_chat_template(CONVERSATION) == GEMMA_CONVERSATION
    without_prompt = tiny.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert without_prompt == GEMMA_CONVERSATION.removesuffix("<start_of_turn>model\n")


def test_gemma_template_without_system_message():
    messages = [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Yo"}]
    assert gemma_chat_prompt(messages, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n")


@pytest.mark.parametrize("messages, match", [
    ([], "at least one user"),
    ([{"role": "system", "content": "x"}], "at least one user"),
    ([{"role": "assistant", "content": "x"}], r"\[0\].*alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"\[1\].*alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], r"\[1\].*alternate"),
    ([{"role": "user", "content": None}], r"\[0\].*content"),
])
def test_gemma_template_rejects_malformed_conversations(messages, match):
    with pytest.raises(InvalidRequestError, match=match):
        gemma_chat_prompt(messages)


def test_the_tokenizers_own_template_wins(tmp_path):
    template = ("{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
                "[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[model]{% endif %}")
    tokenizer = Tokenizer(save_tiny_tokenizer(tmp_path, chat_template=template))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi[model]"
    with pytest.raises(InvalidRequestError, match="no bad roles"):
        tokenizer.apply_chat_template([{"role": "bad", "content": "x"}])


# --- TextStream: incremental decoding -------------------------------------------------------------

@pytest.mark.parametrize("text", MULTILINGUAL)
def test_deltas_concatenate_to_the_full_decode(tiny, text):
    ids = output_ids(tiny, text)
    deltas, _ = stream_all(tiny, ids, prompt_ids=tiny.encode("Say:"))
    assert "".join(deltas) == tiny.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_partial_characters_are_held_until_complete(tiny):
    ids = output_ids(tiny, "a世")  # 'a' then three byte tokens
    assert len(ids) == 4
    stream = TextStream(tiny, [2])
    assert [stream.push(t) for t in ids] == ["a", "", "", "世"]
    assert stream.finish() == ""


def test_invalid_bytes_at_the_end_come_out_at_finish(tiny):
    ids = output_ids(tiny, "ok世")[:-1]  # the model stopped inside a character
    deltas, _ = stream_all(tiny, ids)
    assert "".join(deltas[:-1]) == "ok"
    assert deltas[-1] == tiny.decode(ids)[2:] and "\ufffd" in deltas[-1]


def test_a_run_of_invalid_bytes_is_not_held_forever(tiny):
    continuation_byte = tiny.hf_tokenizer.convert_tokens_to_ids("<0x80>")
    ids = [continuation_byte] * 20
    deltas, _ = stream_all(tiny, ids)
    assert "".join(deltas) == tiny.decode(ids)
    assert len("".join(deltas[:-1])) >= 20 - TextStream.MAX_HELD_TOKENS


def test_special_tokens_produce_no_text(tiny):
    ids = output_ids(tiny, "hi") + [tiny.hf_tokenizer.convert_tokens_to_ids("<end_of_turn>"), 1]
    deltas, _ = stream_all(tiny, ids)
    assert "".join(deltas) == "hi"


def test_prompt_context_works_when_prompt_is_short_or_ends_mid_character(tiny):
    truncated_prompt = output_ids(tiny, "世")[:2]
    for prompt in ([], [2], truncated_prompt):
        deltas, _ = stream_all(tiny, output_ids(tiny, " the world"), prompt_ids=prompt)
        assert "".join(deltas) == " the world"


# --- TextStream: stop strings --------------------------------------------------------------------

def test_stop_string_across_tokens_is_cut_and_never_emitted(tiny):
    text = "the ending STOP now"
    ids = output_ids(tiny, text)
    deltas, stream = stream_all(tiny, ids, stop=("ng ST",))  # spans 'ing' and '▁STOP'
    assert stream.stopped
    assert "".join(deltas) == "the endi"
    assert stream.push(ids[0]) == "" and stream.finish() == ""


def test_possible_stop_prefix_is_held_then_released(tiny):
    ids = output_ids(tiny, "the STOP now")
    stream = TextStream(tiny, [2], stop=("STOP!",))
    deltas = [stream.push(t) for t in ids]
    assert "STOP" not in deltas[1]  # after '▁STOP' the text might still become "STOP!"
    assert "".join(deltas) + stream.finish() == "the STOP now"
    assert not stream.stopped


def test_held_stop_prefix_is_released_at_finish(tiny):
    deltas, stream = stream_all(tiny, output_ids(tiny, "see END"), stop=("ENDING",))
    assert deltas[-1] == "END" and "".join(deltas) == "see END" and not stream.stopped


def test_earliest_stop_string_wins(tiny):
    deltas, stream = stream_all(tiny, output_ids(tiny, "abc the world"), stop=("world", "the", "c t"))
    assert "".join(deltas) == "ab" and stream.stopped


def test_stop_string_at_the_very_start_gives_no_text(tiny):
    deltas, stream = stream_all(tiny, output_ids(tiny, "END of it"), stop=("END",))
    assert "".join(deltas) == "" and stream.stopped


def test_stop_string_made_of_byte_tokens(tiny):
    deltas, stream = stream_all(tiny, output_ids(tiny, "hi 世界 bye"), stop=("界",))
    assert "".join(deltas) == "hi 世" and stream.stopped
    assert not any("\ufffd" in d for d in deltas)


def test_stop_strings_are_ignored_before_min_tokens(tiny):
    ids = output_ids(tiny, "ab ab ab")
    deltas, stream = stream_all(tiny, ids, stop=("ab",), min_tokens=2)
    assert "".join(deltas) == "ab " and stream.stopped


# --- the real Gemma 3 tokenizer -----------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma():
    default_model = pytest.importorskip("backend.default_model")
    return Tokenizer(default_model.ensure_default_checkpoint())


@pytest.mark.slow
def test_gemma_special_ids(gemma):
    assert gemma.bos_token_id == 2
    assert gemma.eos_token_ids >= {1, 106}
    assert gemma.hf_tokenizer.convert_tokens_to_ids("<end_of_turn>") == 106
    assert gemma.vocab_size == 262144
    assert gemma.encode("Hello")[0] == 2


@pytest.mark.slow
def test_gemma_decode_equals_hf_decode_without_clean_up(gemma):
    """decode() goes to the Rust tokenizer directly; it must give what HF's decode gives (no space
    clean-up), special tokens kept or skipped, for any ids (random ones, byte tokens, specials)."""
    import random

    assert gemma._backend is not None  # the real tokenizer is a fast one: the direct path is tested
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.randrange(gemma.vocab_size) for _ in range(rng.randint(0, 12))] + rng.sample([1, 2, 105, 106], 2)
        rng.shuffle(ids)
        for skip in (True, False):
            assert gemma.decode(ids, skip_special_tokens=skip) == gemma.hf_tokenizer.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


@pytest.mark.slow
@pytest.mark.parametrize("text", ["", "Hello", " leading and  double  spaces\n\ttab", "<bos>twice", "<start_of_turn>user\n"
                                  "hi<end_of_turn>\n<start_of_turn>model\n", "x" * 5000, "Zürich → Ελληνικά, 🧑‍🚀"])
def test_gemma_encode_equals_hf_encode(gemma, text):
    """encode() goes to the Rust tokenizer directly; it must give what HF's encode gives, with and
    without the special tokens (<bos>), special tokens in the text included."""
    assert gemma._backend is not None
    for special in (True, False):
        assert gemma.encode(text, add_special_tokens=special) == gemma.hf_tokenizer.encode(
            text, add_special_tokens=special)


@pytest.mark.slow
def test_gemma_chat_prompt_tokens(gemma):
    prompt = gemma.apply_chat_template(CONVERSATION)
    assert prompt == GEMMA_CONVERSATION
    ids = gemma.encode(prompt, add_special_tokens=False)
    assert ids[:2] == [2, 105] and ids.count(2) == 1 and ids.count(106) == 3


@pytest.mark.slow
@pytest.mark.parametrize("text", MULTILINGUAL + ["Zürich → Ελληνικά, हिन्दी, 🧑‍🚀 🫨 ok"])
def test_gemma_stream_deltas(gemma, text):
    ids = output_ids(gemma, text)
    deltas, _ = stream_all(gemma, ids, prompt_ids=gemma.encode("Write:"))
    assert "".join(deltas) == gemma.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.slow
def test_gemma_stop_string(gemma):
    ids = output_ids(gemma, "First line.\nSecond line.")
    deltas, stream = stream_all(gemma, ids, stop=(".\nSec",))
    assert "".join(deltas) == "First line" and stream.stopped
