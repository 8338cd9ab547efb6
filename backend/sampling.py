"""The batched sampler that turns one decode step's logits into tokens (the parameters it follows are
backend.params.SamplingParams).

The logits pipeline is HF transformers' logits processors, in HF's order, so HF is the oracle:
min_tokens masking -> bad words -> repetition penalty -> presence/frequency penalties -> temperature
-> top-k -> top-p -> draw. (Presence and frequency penalties are OpenAI's, as vLLM applies them, and
bad words vLLM's; HF has neither.)
Logprobs, when a row asks for them, come from the raw logits, before any of these steps.
Each sampled row draws from its own torch.Generator, so a seeded request gets the same tokens
whatever else shares its batch.

Verifying drafts (speculative decoding, backend/speculative.py): a sequence with k drafts has k + 1
logit rows, row j scoring the token after draft j (row 0: after its last token), each processed as
the one-token step at that position would be (min_tokens, bad words and penalties see the drafts
before it). Every row picks its token as usual; the drafts are accepted while each equals the pick
of the row before it, and the sequence gets the accepted drafts and the pick of the row after them
(the correction, or with all accepted, the bonus token). Greedy, that is "while the draft is the
argmax": the output is token for token the one-token-per-step output. Sampled, the pick is the
exponential race argmax(p / E), E ~ Exp(1) per token, which makes it rejection sampling with a
point-mass draft q = [d] (Leviathan et al.; a proposer's drafts are certain): the race picks d with
probability p(d) (acceptance p(d) / q(d) = p(d)), and the race among the other tokens is independent
of whether d wins, so on a rejection the pick is a draw from p without d, renormalised - exactly the
residual max(p - q, 0). The output distribution is the model's. A seeded sequence's rows draw its
generator's noise in order, one row per position as without drafts; the rows after a rejection give
their noise back (the generator is rewound to just after the row that ended the sequence's tokens),
so a seed gives the same tokens with speculation on or off, alone or in any batch.
"""
from __future__ import annotations

import math
import os
from array import array
from dataclasses import dataclass
from typing import Collection, Iterable, Optional, Sequence, Union

import torch

from backend.params import SamplingParams, TokenLogprobs


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence in the batch at this step."""
    params: SamplingParams
    generator: Optional[torch.Generator] = None  # None: the global torch RNG (unseeded requests)
    # Prompt + output ids so far, for the repetition penalty; a tensor on the logits' device is cheapest.
    seen_token_ids: Union[torch.Tensor, Sequence[int]] = ()
    num_output_tokens: int = 0
    eos_token_ids: frozenset[int] = frozenset()




@dataclass(frozen=True)
class SampledTokens:
    """One step's sampler output: a token per logit row, and its logprobs where the row asked for
    them. Without drafts, row i is the i-th sequence that sampled; with drafts, `tokens(i)` and
    `token_logprobs(i)` are sequence i's new tokens (the accepted drafts and the one after them)."""
    token_ids: list[int]
    logprobs: list[Optional[TokenLogprobs]]
    failed_rows: tuple[int, ...] = ()  # sequences (by index) whose scores were not finite: they fail, the others go on
    first_rows: Optional[list[int]] = None  # per sequence, its first logit row; None: row i is sequence i
    num_accepted: Optional[list[int]] = None  # per sequence, its drafts accepted; None: nobody had drafts

    def tokens(self, i: int) -> list[int]:
        if self.first_rows is None:
            return [self.token_ids[i]]
        first = self.first_rows[i]
        return self.token_ids[first:first + 1 + self.num_accepted[i]]

    def every_sequence_tokens(self) -> list[list[int]]:
        """tokens(i) of every sequence, in one pass (the engine asks for all of them each step)."""
        if self.first_rows is None:
            return [[token] for token in self.token_ids]
        return [self.tokens(i) for i in range(len(self.first_rows))]

    @property
    def any_logprobs(self) -> bool:
        return any(lp is not None for lp in self.logprobs)

    def token_logprobs(self, i: int) -> Optional[list[TokenLogprobs]]:
        """Sequence i's new tokens' logprobs; None if it did not ask for them."""
        first = i if self.first_rows is None else self.first_rows[i]
        if self.logprobs[first] is None:
            return None
        return self.logprobs[first:first + 1 + (0 if self.num_accepted is None else self.num_accepted[i])]


def make_generator(seed: Optional[int], device: Union[torch.device, str]) -> torch.Generator:
    """A generator on `device` seeded with `seed`, or with fresh OS entropy when seed is None."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    return generator


class NonFiniteLogitsError(RuntimeError):
    """Rows whose logits hold NaN or +inf, or whose every token is masked (-inf): nothing can be
    sampled from them (an argmax would pick token 0, a token the model did not rank).

    `token_ids` holds every row's token, drawn as usual: the caller fails the requests of `rows` and
    keeps the other rows' tokens (sampling them again would draw twice from their seeded generators).
    The listed rows' entries are meaningless."""

    def __init__(self, rows: list[int], token_ids: list[int]):
        super().__init__(f"non-finite logits in batch row(s) {rows}")
        self.rows, self.token_ids = rows, token_ids


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
    """Pick one token per row of `logits` [B, V]; rows[i] describes row i. Raises
    NonFiniteLogitsError for rows that cannot be sampled."""
    token_ids, finite, _ = _sample_on_device(logits, rows)
    return _checked(token_ids, finite)


def _sample_on_device(logits: torch.Tensor, rows: Sequence[SamplingRow], keep_states: frozenset[int] = frozenset()
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Each row's token, and whether the row could be sampled at all (see _best), on the device;
    and for the seeded sampled rows in `keep_states`, their generator's state before their draw."""
    if not any(_needs_processing(row) for row in rows):  # all-greedy batch: no float copy, no Python per row
        return (*_best(logits), {})
    scores = _penalized_scores(logits, rows)
    token_ids, finite = _best(scores)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    states: dict[int, torch.Tensor] = {}
    if sampled:
        index = _on_device(sampled, scores.device)
        warped = _warp(scores[index], [rows[i].params for i in sampled])
        keep = {j: i for j, i in enumerate(sampled) if i in keep_states}
        token_ids[index], kept = _draw(warped, [rows[i].generator for i in sampled], frozenset(keep))
        states = {keep[j]: state for j, state in kept.items()}
    return token_ids, finite, states


class SampledOnDevice:
    """One step's sampler output while it is still on the device. `token_ids` can feed the next
    step at once; the copy to the host starts here without waiting, and only `result()` waits for
    it (on a GPU the host meanwhile prepares the next step).

    `rows` describe the logit rows; None: every row is a sequence whose params sample plainly
    (`SamplingParams.samples_plainly`: its token is the argmax, once `early_stops` - row -> the ids
    that row may not pick yet, see `early_stops` - are written as -inf into `logits` in place). With
    `drafts` (a list per sequence that samples, in order), sequence s has 1 + len(drafts[s])
    consecutive rows, which verify its drafts (module docstring); without, each row is a sequence
    of its own."""

    def __init__(self, logits: torch.Tensor, rows: Optional[Sequence[SamplingRow]],
                 drafts: Optional[Sequence[Sequence[int]]] = None,
                 early_stops: Optional[dict[int, frozenset[int]]] = None):
        self._drafts = drafts if drafts is not None and any(drafts) else None
        if rows is None:
            if early_stops:  # no float copy of the logits: nothing else reads a plain row's raw logits
                _ban(logits, early_stops.items())
            self.token_ids, finite = _best(logits)
            self._states, self._asking = {}, []
        else:
            # Seeded sampled rows after a sequence's first: where its generator is rewound to on a rejection.
            rewind = frozenset(first + j for first, d in zip(_first_rows(self._drafts), self._drafts or ())
                               for j in range(1, len(d) + 1)
                               if rows[first].generator is not None and not rows[first].params.greedy)
            self.token_ids, finite, self._states = _sample_on_device(logits, rows, rewind)
            self._asking = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        self._rows = rows
        on_device = [torch.stack([self.token_ids, finite.to(self.token_ids.dtype)])]
        if self._asking:
            on_device += _logprobs_on_device(logits, self.token_ids, rows, self._asking)
        self._on_host, self._copied = on_device, None
        if logits.is_cuda:  # into pinned memory: a copy into pageable memory would wait for the GPU
            self._on_host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                             for t in on_device]
            self._copied = torch.cuda.Event()
            self._copied.record()

    def result(self) -> SampledTokens:
        """The tokens and logprobs on the host; sequences that could not be sampled in `failed_rows`.
        With drafts, also how many each sequence accepted (a seeded one's generator is rewound past
        the rows it did not use)."""
        if self._copied is not None:
            self._copied.synchronize()
        tokens, ok = self._on_host[0].tolist()
        logprobs: list[Optional[TokenLogprobs]] = [None] * len(tokens)
        if self._asking:
            values, ranks_and_ids = self._on_host[1].tolist(), self._on_host[2].tolist()
            _fill_logprobs(logprobs, self._rows, self._asking, tokens, values, ranks_and_ids)
        if self._drafts is None:
            return SampledTokens(tokens, logprobs, tuple(i for i, row_ok in enumerate(ok) if not row_ok))
        first_rows = _first_rows(self._drafts)
        accepted, failed = [], []
        for s, (first, drafts) in enumerate(zip(first_rows, self._drafts)):
            a = 0  # a row that could not be sampled ends the sequence's tokens (and fails it)
            while a < len(drafts) and ok[first + a] and tokens[first + a] == drafts[a]:
                a += 1
            accepted.append(a)
            if not ok[first + a]:
                failed.append(s)
            if first + a + 1 in self._states:  # seeded: the rows after the last one used drew for nothing
                self._rows[first].generator.set_state(self._states[first + a + 1])
        return SampledTokens(tokens, logprobs, tuple(failed), first_rows, accepted)


def _first_rows(drafts: Optional[Sequence[Sequence[int]]]) -> list[int]:
    """Each sequence's first logit row: a sequence with k drafts has k + 1 rows."""
    firsts, row = [], 0
    for d in drafts or ():
        firsts.append(row)
        row += 1 + len(d)
    return firsts


def sample_with_logprobs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampledTokens:
    """`sample`, plus each asking row's TokenLogprobs (None for the other rows). Rows that cannot be
    sampled are listed in `failed_rows` instead of failing the batch."""
    return SampledOnDevice(logits, rows).result()


def _logprobs_on_device(logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow],
                        asking: list[int]) -> list[torch.Tensor]:
    """For the `asking` rows, from the raw logits: [chosen logprob, top-k logprobs] values and
    [chosen rank, top-k ids] integers, k the most any row asked for. Only those rows are computed,
    together; a batch where none asked never calls this."""
    index = _on_device(asking, logits.device)
    logprobs = torch.log_softmax(logits[index].to(torch.float32), dim=-1)
    chosen = logprobs.gather(1, token_ids[index][:, None])
    rank = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1
    k = max(rows[i].params.logprobs for i in asking)
    top_values, top_ids = logprobs.topk(k, dim=-1)  # sorted, best first; k == 0 gives empty rows
    return [torch.cat([chosen, top_values], dim=1), torch.cat([rank, top_ids], dim=1)]


def _fill_logprobs(result: list, rows: Sequence[SamplingRow], asking: list[int], token_ids: Sequence[int],
                   values: list[list[float]], ranks_and_ids: list[list[int]]) -> None:
    for row_values, row_ints, i in zip(values, ranks_and_ids, asking):
        n = rows[i].params.logprobs
        result[i] = TokenLogprobs(token_ids[i], row_values[0], row_ints[0], tuple(row_ints[1:n + 1]),
                                  tuple(row_values[1:n + 1]))


def _best(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the best token (the first of equals, as argmax picks), and whether its score is finite,
    from one pass over the scores (argmax and amax read a [256, 262144] step's logits twice). A row's
    max is NaN if any score is NaN (max propagates it), +inf for an infinite logit, -inf when every
    token is masked; -inf elsewhere only rules tokens out."""
    best, token_ids = scores.max(dim=-1)
    return token_ids, torch.isfinite(best)


def _checked(token_ids: torch.Tensor, finite: torch.Tensor) -> list[int]:
    """The tokens as a list (one device-to-host copy with the row checks), or NonFiniteLogitsError."""
    tokens, ok = torch.stack([token_ids, finite.to(token_ids.dtype)]).tolist()
    bad = [i for i, row_ok in enumerate(ok) if not row_ok]
    if bad:
        raise NonFiniteLogitsError(bad, tokens)
    return tokens


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The float32 scores `sample` draws from: greedy rows are penalised only, sampled rows also warped."""
    scores = _penalized_scores(logits, rows)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if sampled:
        index = _on_device(sampled, scores.device)
        scores[index] = _warp(scores[index], [rows[i].params for i in sampled])
    return scores


def _on_device(values: Sequence, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A short per-row list as a tensor on `device`. torch.tensor(values, device=cuda) would wait for
    all queued GPU work before copying; a non-blocking copy from a fresh CPU tensor does not."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _ints_on(values: list[int], device: torch.device) -> torch.Tensor:
    """A non-empty list of ints as a long tensor on `device`, through an array('q'): torch.tensor walks
    a list in Python, 0.12 us an element (120 us for the early stops of a 256-row step)."""
    return torch.frombuffer(array("q", values), dtype=torch.long).to(device, non_blocking=True)


def _needs_processing(row: SamplingRow) -> bool:
    params = row.params
    return (not params.greedy or params.reads_token_history or bool(params.bad_words_token_ids)
            or row.num_output_tokens < params.min_tokens)


def _penalized_scores(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    scores = logits.to(torch.float32, copy=True)
    _mask_banned_tokens(scores, rows)
    _apply_repetition_penalty(scores, rows)
    _apply_occurrence_penalties(scores, rows)
    return scores


def _mask_banned_tokens(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """-inf for each row's early stops and bad words' last tokens."""
    _ban(scores, ((i, early_stops(row.params, row.num_output_tokens, row.eos_token_ids) | _bad_word_ends(row))
                  for i, row in enumerate(rows)))


@torch.inference_mode()  # the plain path writes into the forward's logits, inference tensors
def _ban(scores: torch.Tensor, banned: Iterable[tuple[int, Collection[int]]]) -> None:
    """-inf at each (row, its banned token ids), in one write for the batch."""
    row_index: list[int] = []
    token_index: list[int] = []
    for i, ids in banned:
        row_index += [i] * len(ids)
        token_index += ids
    if row_index:
        device = scores.device
        scores[_ints_on(row_index, device), _ints_on(token_index, device)] = -math.inf


def early_stops(params: SamplingParams, num_output_tokens: int, eos_token_ids: frozenset[int]) -> frozenset[int]:
    """Before min_tokens: EOS and stop_token_ids (HF MinNewTokensLengthLogitsProcessor)."""
    if num_output_tokens < params.min_tokens:
        return eos_token_ids.union(params.stop_token_ids) if params.stop_token_ids else eos_token_ids
    return frozenset()


def _bad_word_ends(row: SamplingRow) -> frozenset[int]:
    """vLLM's bad words: each sequence's last token, where the output so far ends with the rest of
    the sequence (a one-token sequence: always). As in vLLM only generated tokens count, so the
    output may finish a word the prompt began."""
    words = row.params.bad_words_token_ids
    if not words:
        return frozenset()
    longest_prefix = min(max(len(ids) for ids in words) - 1, row.num_output_tokens)
    seen = row.seen_token_ids
    tail = seen[len(seen) - longest_prefix:] if longest_prefix else []
    tail = tuple(tail.tolist() if isinstance(tail, torch.Tensor) else tail)
    return frozenset(ids[-1] for ids in words
                     if len(ids) - 1 <= len(tail) and tail[len(tail) - len(ids) + 1:] == ids[:-1])


def _apply_repetition_penalty(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """HF RepetitionPenaltyLogitsProcessor: seen tokens' negative scores are multiplied, positive divided."""
    penalized = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not penalized:
        return
    device = scores.device
    seen = [_token_ids_on(rows[i].seen_token_ids, device) for i in penalized]
    counts = _on_device([len(ids) for ids in seen], device)
    total = sum(len(ids) for ids in seen)
    # Each seen id beside its batch row and penalty: one gather and one scatter for the whole batch,
    # touching only seen scores. An id seen twice is written twice with the same value, so every
    # seen id is penalised once, as in HF.
    batch_rows = torch.repeat_interleave(_on_device(penalized, device), counts, output_size=total)
    penalty = torch.repeat_interleave(_on_device([rows[i].params.repetition_penalty for i in penalized], device),
                                      counts, output_size=total)
    token_ids = torch.cat(seen)
    seen_scores = scores[batch_rows, token_ids]
    scores[batch_rows, token_ids] = torch.where(seen_scores < 0, seen_scores * penalty, seen_scores / penalty)


def _apply_occurrence_penalties(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """OpenAI's penalties over the tokens generated so far (not the prompt), as vLLM applies them:
    score -= presence_penalty * (count > 0) + frequency_penalty * count."""
    penalized = [i for i, row in enumerate(rows) if row.params.penalizes_occurrences and row.num_output_tokens]
    if not penalized:
        return
    device = scores.device
    generated = [_token_ids_on(rows[i].seen_token_ids[-rows[i].num_output_tokens:], device) for i in penalized]
    counts = _on_device([len(ids) for ids in generated], device)
    total = sum(len(ids) for ids in generated)
    batch_rows = torch.repeat_interleave(_on_device(penalized, device), counts, output_size=total)
    token_ids = torch.cat(generated)

    def per_id(values: list[float]) -> torch.Tensor:
        return torch.repeat_interleave(_on_device(values, device), counts, output_size=total)

    # Presence: a plain write, so an id generated twice gets the same value twice (penalised once).
    presence = per_id([rows[i].params.presence_penalty for i in penalized])
    scores[batch_rows, token_ids] = scores[batch_rows, token_ids] - presence
    # Frequency: an accumulating write subtracts the penalty once per occurrence.
    frequency = per_id([rows[i].params.frequency_penalty for i in penalized])
    scores.index_put_((batch_rows, token_ids), -frequency, accumulate=True)


def _token_ids_on(ids: Union[torch.Tensor, Sequence[int]], device: torch.device) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.to(device=device, dtype=torch.long, non_blocking=True)
    return _on_device(ids, device, torch.long)


def _warp(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, on the sampled rows' scores [n, V] (modified in place)."""
    device, vocab_size = scores.device, scores.shape[-1]
    scores /= _on_device([p.temperature for p in params], device)[:, None]

    top_k = [min(p.top_k, vocab_size) for p in params]
    if any(top_k):
        # HF TopKLogitsWarper: drop scores below the k-th largest (ties with it survive); k == 0 keeps all.
        k = _on_device(top_k, device)[:, None]
        top_values = torch.topk(scores, max(top_k), dim=-1).values
        kth_value = top_values.gather(1, (k - 1).clamp_min(0))
        threshold = torch.where(k > 0, kth_value, -math.inf)
        scores.masked_fill_(scores < threshold, -math.inf)

    nucleus = [j for j, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        index = _on_device(nucleus, device)
        scores[index] = _top_p(scores[index], [params[j].top_p for j in nucleus])
    return scores


# A nucleus almost always lies within this many most likely tokens; ranking only them is several
# times cheaper than sorting a 262144-token vocabulary.
NUCLEUS_CANDIDATES = 4096


def _top_p(scores: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """HF TopPLogitsWarper: keep tokens, most likely first, while the mass before them is < top_p.

    (HF drops tokens whose ascending cumulative mass is <= 1 - top_p: the same set, up to rounding.)
    """
    vocab_size = scores.shape[-1]
    threshold = _on_device(top_p, scores.device)[:, None]
    probs = scores.softmax(dim=-1)
    top_probs, top_ids = probs.topk(min(NUCLEUS_CANDIDATES, vocab_size), dim=-1)
    # Checking that the candidates hold every nucleus waits for the GPU once; worth it to skip the sort.
    if top_ids.shape[-1] < vocab_size and not bool((top_probs.sum(-1, keepdim=True) >= threshold).all()):
        top_probs, top_ids = probs.sort(dim=-1, descending=True)  # a wider nucleus: rank everything
    keep = top_probs.cumsum(dim=-1) - top_probs < threshold
    keep[:, 0] = True  # the most likely token always stays, even for a top_p that rounds to 0 in float32
    kept_scores = torch.where(keep, scores.gather(1, top_ids), -math.inf)
    return torch.full_like(scores, -math.inf).scatter_(1, top_ids, kept_scores)


def _draw(scores: torch.Tensor, generators: Sequence[Optional[torch.Generator]],
          keep_states: frozenset[int] = frozenset()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Sample each row: argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race).

    Noise for a seeded row comes only from its own generator, so its draw ignores the other rows.
    Rows of one generator draw in row order; for the rows in `keep_states`, their generator's state
    before the draw is returned (by row).
    """
    probs = scores.softmax(dim=-1)
    noise = torch.empty_like(probs)
    states = {}
    if any(g is None for g in generators):
        noise.exponential_()  # one global-RNG draw for all unseeded rows; seeded rows overwrite theirs
    for row, generator in enumerate(generators):
        if generator is not None:
            if row in keep_states:
                states[row] = generator.get_state()
            noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1), states
