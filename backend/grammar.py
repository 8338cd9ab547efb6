"""Structured outputs: a request's constraint (backend.params.StructuredOutputs) -> a grammar matcher
for its sequence, and each step's allowed tokens applied to the logits.

llguidance compiles and matches (the measured choice: docs/structured-outputs.md). Compiling runs on
worker threads beside the engine loop, cached by constraint: a request waits for its grammar while
the others keep stepping, and one whose constraint does not compile (or not within
EngineConfig.grammar_compile_timeout_s, counted once the tokenizer's index exists: building it is
the first request's cost, not its constraint's) ends "invalid" alone. Each sequence gets a copy of the
compiled matcher (a copy is ~2 us, a fresh matcher ~0.5 ms); the engine core advances it on every
token the sequence accepts, and a grammar that can go no further ends the sequence "stop".

Per step, the constrained rows' bitmasks are filled on the host (one parallel call for the batch),
copied to the device with the step's other inputs and applied to the logits outside any CUDA graph,
before the sampler: penalties, temperature, top-k/p and logprobs all see the masked logits (vLLM
reports logprobs after its grammar bitmask too).
"""
from __future__ import annotations

import collections
import json
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import llguidance
import numpy as np
import torch

from .params import StructuredOutputs

COMPILED_CACHE_SIZE = 256  # constraints kept compiled (a JSON schema's matcher holds a few hundred KB at most)
COMPILE_THREADS = 2


class GrammarError(ValueError):
    """A constraint the library refused; the message names the field and gives the library's words."""


def grammar_text(constraint: StructuredOutputs) -> str:
    """The constraint as an llguidance grammar (its JSON form, naming the grammar's kind)."""
    if constraint.json is not None or constraint.json_object:
        schema = json.loads(constraint.json) if constraint.json is not None else {"type": "object"}
        if constraint.disable_additional_properties:
            schema = _closed_objects(schema)
        options = {"whitespace_flexible": not constraint.disable_any_whitespace}
        if constraint.whitespace_pattern is not None:
            options["whitespace_pattern"] = constraint.whitespace_pattern
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if constraint.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(constraint.regex)
    if constraint.choice is not None:
        # Lark string literals read JSON's escapes, so any string is one alternative, verbatim.
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in constraint.choice))
    text = constraint.grammar
    if "::=" in text:  # GBNF (llama.cpp's, xgrammar's EBNF): vLLM's default backend reads it
        try:
            text = llguidance.gbnf_to_lark.gbnf_to_lark(text)
        except Exception as e:  # noqa: BLE001 - the converter raises several kinds for bad input
            raise GrammarError(f"'structured_outputs.grammar' is not a valid GBNF grammar: {e}") from None
    return llguidance.LLMatcher.grammar_from_lark(text)


def _closed_objects(schema: Any) -> Any:
    """vLLM's disable_additional_properties: every object schema that does not say otherwise takes
    only the properties it names."""
    if isinstance(schema, list):
        return [_closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed_objects(value) for key, value in schema.items()}
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


class GrammarCompiler:
    """Compiles constraints on its own threads against the model's tokenizer (built on first use,
    ~2 s for Gemma's 262k tokens, off the engine loop too), caching the compiled matchers."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_token_ids: frozenset[int],
                 on_done: Callable[[], None]):
        # The library takes one EOS; Grammar lets the others end a complete grammar too.
        self._tokenizer_json, self._vocab_size, self._eos = tokenizer_json, vocab_size, min(eos_token_ids)
        self._on_done = on_done  # wakes the engine loop
        self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="gemma-grammar")
        self._tokenizer_lock = threading.Lock()
        self._tokenizer: Optional[llguidance.LLTokenizer] = None
        self.ready_since: Optional[float] = None  # time.monotonic() once the tokenizer is built
        self._compiled: collections.OrderedDict[StructuredOutputs, Future] = collections.OrderedDict()

    def compile(self, constraint: StructuredOutputs, timeout_s: float) -> "PendingGrammar":
        """The constraint's compiled matcher, coming (copy it per sequence: `Grammar`); the future's
        exception is a GrammarError naming what is wrong."""
        return PendingGrammar(self._compiled_future(constraint), time.monotonic(), timeout_s, self)

    def _compiled_future(self, constraint: StructuredOutputs) -> Future:
        future = self._compiled.get(constraint)
        if future is not None and not (future.done() and future.exception() is not None):
            self._compiled.move_to_end(constraint)
        else:  # first time, or it failed before (a failure is not kept: it may have been the tokenizer)
            future = self._pool.submit(self._compile, constraint)
            self._compiled[constraint] = future
            if len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        future.add_done_callback(lambda _: self._on_done())
        return future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, constraint: StructuredOutputs) -> llguidance.LLMatcher:
        tokenizer = self._tokenizer_once()
        field = f"structured_outputs.{constraint.kind}"
        try:
            grammar = grammar_text(constraint)
        except GrammarError:
            raise
        except Exception as e:  # noqa: BLE001 - llguidance reports a bad schema or regex as ValueError/RuntimeError
            raise GrammarError(f"'{field}' is invalid: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise GrammarError(f"'{field}' is invalid: {error}")
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        if matcher.is_error():
            raise GrammarError(f"'{field}' is invalid: {matcher.get_error()}")
        return matcher

    def _tokenizer_once(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json.read_text(), n_vocab=self._vocab_size,
                                                         eos_token=self._eos)
                self.ready_since = time.monotonic()
                self._on_done()  # the engine loop starts the waiting grammars' clocks
            return self._tokenizer


@dataclass
class PendingGrammar:
    """A sequence's constraint being compiled, and until when it may take."""
    future: Future
    submitted: float  # time.monotonic()
    timeout_s: float
    compiler: GrammarCompiler

    @property
    def deadline(self) -> float:
        """time.monotonic() past which the compile has failed; infinite until the tokenizer exists."""
        ready = self.compiler.ready_since
        return math.inf if ready is None else max(self.submitted, ready) + self.timeout_s

    def timed_out(self, now: float) -> bool:
        return not self.future.done() and now > self.deadline

    def result(self, timeout: Optional[float] = None) -> llguidance.LLMatcher:
        """The compiled matcher, waiting for it (GrammarError if the constraint is invalid)."""
        return self.future.result(timeout)


class Grammar:
    """One sequence's matcher: what it may generate next, advanced on each token it accepts.
    `end_token_ids` (its EOS and stop ids) may end it wherever the grammar is complete: the library
    knows one EOS, and an instruction-tuned Gemma ends its turn with <end_of_turn>, not <eos>."""

    def __init__(self, compiled: llguidance.LLMatcher, end_token_ids: frozenset[int]):
        self.matcher = compiled.deep_copy()
        self.end_token_ids = sorted(end_token_ids)

    def accept(self, token_id: int) -> Optional[str]:
        """Advance on a generated token. Returns why the sequence ends here, if it does: "stop" when
        the grammar is complete and nothing may follow; an error message if the token broke it."""
        if not self.matcher.consume_token(token_id):
            return self.matcher.get_error() or f"token {token_id} does not fit the constraint"
        return "stop" if self.matcher.is_stopped() else None


_executor: Optional[llguidance.LLExecutor] = None


@torch.inference_mode()  # the logits are the forward's inference tensors
def mask_logits(logits: torch.Tensor, grammars: Sequence[Optional[Grammar]]) -> None:
    """-inf, in place, for every token row i's grammar does not allow next (rows without one: none)."""
    global _executor
    constrained = [(grammar.matcher, slot) for slot, grammar in enumerate(g for g in grammars if g is not None)]
    if not constrained:
        return
    if _executor is None:
        _executor = llguidance.LLExecutor()
    rows = [i for i, grammar in enumerate(grammars) if grammar is not None]
    vocab_size = logits.shape[-1]
    # One bit per token, 32 to an int32, filled by the library's threads for all rows at once. (Not
    # llguidance.torch's helpers: that module runs torch.compile when imported, pulling in inductor.)
    bitmask = torch.empty((len(rows), (vocab_size + 31) // 32), dtype=torch.int32, pin_memory=logits.is_cuda)
    _executor.unsafe_compute_mask_ptr(constrained, bitmask.data_ptr(), bitmask.shape[1] * 4, len(rows))
    allowed = _unpacked(bitmask, logits.device)[:, :vocab_size]
    ends = [(slot, token) for slot, (matcher, _) in enumerate(constrained) if matcher.is_accepting()
            for token in grammars[rows[slot]].end_token_ids if token < vocab_size]
    if ends:
        slots, tokens = zip(*ends)
        allowed[torch.tensor(slots), torch.tensor(tokens)] = True
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(allowed.logical_not_(), -float("inf"))
    else:
        index = torch.tensor(rows).to(logits.device, non_blocking=True)
        logits[index] = logits[index].masked_fill(allowed.logical_not_(), -float("inf"))


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _unpacked(bitmask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[rows, words] int32 bits (token 32w + k is bit k of word w) -> [rows, 32 * words] bools on `device`.
    On a GPU the bits travel packed and are unpacked there; on the CPU numpy's unpackbits is ~20x
    faster than shifting torch tensors (a 262k vocabulary: ~0.1 ms a row)."""
    if device.type == "cpu":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")  # int32 is little-endian
        return torch.from_numpy(bits).view(torch.bool)
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    words = bitmask.to(device, non_blocking=True)
    return ((words[:, :, None] >> shifts) & 1).reshape(len(words), -1).bool()
