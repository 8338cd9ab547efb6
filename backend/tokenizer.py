"""The checkpoint's tokenizer, Gemma's chat format, and TextStream: token ids -> text safe to send."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from jinja2 import TemplateError
from transformers import AutoTokenizer

from backend.errors import InvalidRequestError

# Gemma's own chat template spells the assistant "model"; both spellings are accepted.
_GEMMA_ROLES = {"user": "user", "assistant": "model", "model": "model"}


class Tokenizer:
    """A checkpoint directory's HF tokenizer plus the ids generation needs (BOS, every EOS)."""

    def __init__(self, path: Union[str, Path]):
        path = Path(path)
        self.hf_tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.bos_token_id: Optional[int] = self.hf_tokenizer.bos_token_id
        self.eos_token_ids = _eos_token_ids(path, self.hf_tokenizer.eos_token_id)
        # len() counts added tokens as well; HF's own `vocab_size` leaves them out for some tokenizers.
        self.vocab_size = len(self.hf_tokenizer)
        # The Rust tokenizer of a fast HF tokenizer: decoding through it directly is what HF's decode
        # does without space clean-up, minus ~1.5 us of argument conversion a call; encoding, what HF's
        # encode does in 9 us instead of 20 (its Python wrapper). Streaming decodes twice per token per
        # request, and every request is encoded, on the threads that share the Triton stub's GIL.
        self._backend = getattr(self.hf_tokenizer, "backend_tokenizer", None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, Gemma's tokenizer prepends <bos>."""
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of each text, with special tokens; the Rust tokenizer does them in parallel with
        the GIL released (10 prompts of 1,024 tokens: 9 ms against 17 one by one on 2 cores)."""
        if self._backend is not None:
            return [encoding.ids for encoding in self._backend.encode_batch(list(texts))]
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # No space clean-up (" ," -> ","): it rewrites model output, and a decode of a window of
        # tokens would then disagree with the decode of the whole sequence.
        if self._backend is not None:
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id's text alone, special tokens spelt out (a byte of a longer character decodes to U+FFFD)."""
        return self.hf_tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                              clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation. Gemma's templates begin it with <bos>: encode it with
        add_special_tokens=False, or the prompt starts with two."""
        if not self.hf_tokenizer.chat_template:  # e.g. the default checkpoint, converted from GGUF
            bos = self.hf_tokenizer.bos_token or "<bos>"
            return gemma_chat_prompt(messages, add_generation_prompt, bos=bos)
        try:
            return self.hf_tokenizer.apply_chat_template(list(messages), tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
        except TemplateError as e:  # the template's raise_exception(): a malformed conversation
            raise InvalidRequestError(f"'messages': {e}") from None


def _eos_token_ids(path: Path, tokenizer_eos: Optional[int]) -> frozenset[int]:
    # Chat checkpoints end a turn with more than <eos> (Gemma: <end_of_turn>); only the generation
    # config lists them all.
    generation_config = path / "generation_config.json"
    if generation_config.exists():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        if eos is not None:
            return frozenset([eos] if isinstance(eos, int) else eos)
    return frozenset() if tokenizer_eos is None else frozenset([tokenizer_eos])


def gemma_chat_prompt(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                      bos: str = "<bos>") -> str:
    """Gemma's turn format, as its official chat template writes it.

    A leading system message becomes the head of the first user turn (Gemma has no system role),
    turns alternate user/model starting with user, and each turn's content is stripped.
    """
    system_prefix = ""
    first = 0
    if messages and messages[0].get("role") == "system":
        system_prefix = _content(messages[0], 0) + "\n\n"
        first = 1
    if first == len(messages):
        raise InvalidRequestError("'messages' must hold at least one user message")
    turns = [bos]
    for i in range(first, len(messages)):
        role = _GEMMA_ROLES.get(messages[i].get("role"))
        expected = "user" if (i - first) % 2 == 0 else "model"
        if role != expected:
            raise InvalidRequestError(f"'messages'[{i}]: roles must alternate user/assistant starting with user "
                                      f"(after an optional system message); got {messages[i].get('role')!r}")
        head = system_prefix if i == first else ""
        turns.append(f"<start_of_turn>{role}\n{head}{_content(messages[i], i).strip()}<end_of_turn>\n")
    if add_generation_prompt:
        turns.append("<start_of_turn>model\n")
    return "".join(turns)


def _content(message: Mapping[str, str], index: int) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise InvalidRequestError(f"'messages'[{index}]: 'content' must be a string")
    return content


class TextStream:
    """One sequence's incremental detokenizer: push token ids, get text deltas that are safe to send.

    Deltas never end inside a UTF-8 character (HF decodes incomplete bytes as U+FFFD; those tokens
    are held until the character completes) and never hold the start of a stop string that might
    still complete. All deltas + finish() == tokenizer.decode(output ids), cut before the first stop,
    whenever the output is valid UTF-8. (On invalid bytes HF's byte-fallback decoder turns the whole
    run of byte tokens into U+FFFD, valid ones included; the stream has already sent those.)

    Each push decodes only a short window (vLLM's prefix/read offsets): the tokens read last time,
    as left context, and the tokens not read yet. So a step costs O(1), not O(length).
    """

    # Prompt tokens decoded as left context for the first output token, so that its text is what it
    # will be inside the whole sequence (decoders may treat a sequence's first token specially).
    CONTEXT_TOKENS = 4
    # One character is at most 4 byte tokens. A window still ending in U+FFFD after this many held
    # tokens is invalid bytes from the model, not a character in progress; it is released as is.
    MAX_HELD_TOKENS = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 min_tokens: int = 0):
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._min_tokens = min_tokens  # stop strings count only in text of tokens after this many
        context = [int(t) for t in prompt_ids[max(0, len(prompt_ids) - self.CONTEXT_TOKENS):]]
        if tokenizer.decode(context).endswith("\ufffd"):
            context = []  # a prompt ending mid-character would garble the first output character
        self._ids = context
        self._prefix_offset = 0  # window start: the tokens read last time, decoded again as context
        self._read_offset = len(context)  # tokens from here on have not been read into text yet
        self._num_output_tokens = 0
        self._unsent = ""  # decoded text held back because it may be the start of a stop string
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once a stop string appeared; the text before it has been returned, nothing after."""
        return self._stopped

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became safe to send (often "")."""
        if self._stopped:
            return ""
        self._ids.append(int(token_id))
        self._num_output_tokens += 1
        return self._release(self._decode_unread(final=False), final=False)

    def push_many(self, token_ids: Sequence[int]) -> str:
        """push() for several tokens with one decode: the text they make safe to send. Only for a
        stream without stop strings (where a stop string begins depends on each token's text)."""
        assert not self._stop, "push_many decodes once: stop strings need push()"
        if self._stopped or not token_ids:
            return ""
        self._ids.extend(int(t) for t in token_ids)
        self._num_output_tokens += len(token_ids)
        return self._release(self._decode_unread(final=False), final=False)

    def finish(self) -> str:
        """The text still held back (end of generation): incomplete bytes and stop-string prefixes."""
        if self._stopped:
            return ""
        return self._release(self._decode_unread(final=True), final=True)

    def _decode_unread(self, final: bool) -> str:
        decode = self._tokenizer.decode
        context_text = decode(self._ids[self._prefix_offset:self._read_offset])
        window_text = decode(self._ids[self._prefix_offset:])
        held_tokens = len(self._ids) - self._read_offset
        if window_text.endswith("\ufffd") and held_tokens < self.MAX_HELD_TOKENS and not final:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return window_text[len(context_text):]

    def _release(self, text: str, final: bool) -> str:
        self._unsent += text
        if self._num_output_tokens <= self._min_tokens:
            sendable, self._unsent = self._unsent, ""
            return sendable
        stop_at = _first_stop(self._unsent, self._stop)
        if stop_at is not None:
            self._stopped = True
            sendable, self._unsent = self._unsent[:stop_at], ""
            return sendable
        held = 0 if final else _stop_prefix_length(self._unsent, self._stop)
        cut = len(self._unsent) - held
        sendable, self._unsent = self._unsent[:cut], self._unsent[cut:]
        return sendable


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Where the earliest stop string in `text` begins, or None."""
    starts = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(starts) if starts else None


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    longest = 0
    for stop in stops:
        # Only a position holding the stop's first character can start it.
        start = text.find(stop[0], max(0, len(text) - len(stop) + 1))
        while start >= 0:
            if stop.startswith(text[start:]):
                longest = max(longest, len(text) - start)
                break
            start = text.find(stop[0], start + 1)
    return longest
