"""An OpenAI request -> one Triton request per choice, with its prompt and sampling parameters.

`n` choices are n independent requests. With a `seed`, choice 0 uses it as is (so an n=1 request
and the first choice of an n=2 one agree) and choice k > 0 a seed hashed from (seed, k): distinct,
reproducible, and not the seed of a neighbouring request's choice (seed + k would be).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .schemas import GenerationRequest

SEED_SPACE = 2**64  # the engine's seed range; OpenAI's seeds are signed 64-bit


@dataclass(frozen=True)
class ChoiceRequest:
    index: int         # the choice's index in the response
    prompt_index: int  # which of the request's prompts (completions take a list)
    prompt: str
    sampling: dict[str, Any]  # AsyncGemmaClient.stream/generate keywords; None means the server default


def choice_requests(request: GenerationRequest, prompts: Sequence[str], extra_stop: Sequence[str] = (),
                    structured_outputs: Optional[dict[str, Any]] = None) -> list[ChoiceRequest]:
    """Choices in OpenAI's order: each prompt's n choices, then the next prompt's. `structured_outputs`
    constrains every choice (structured.py, tools.py)."""
    stop = [*(request.stop or ()), *extra_stop]
    shared = dict(max_tokens=request.max_output_tokens, temperature=request.temperature,
                  top_p=request.top_p, presence_penalty=request.presence_penalty,
                  frequency_penalty=request.frequency_penalty, logprobs=request.num_top_logprobs,
                  stop=stop or None, ignore_eos=request.ignore_eos, min_tokens=request.min_tokens or None,
                  structured_outputs=structured_outputs)
    pairs = [(p, prompt) for p, prompt in enumerate(prompts) for _ in range(request.n)]
    seeds = choice_seeds(request.seed, len(pairs))
    return [ChoiceRequest(k, p, prompt, {**shared, "seed": seeds[k]}) for k, (p, prompt) in enumerate(pairs)]


def choice_seeds(seed: Optional[int], count: int) -> list[Optional[int]]:
    if seed is None:
        return [None] * count
    base = seed % SEED_SPACE
    return [base] + [_derived(base, k) for k in range(1, count)]


def _derived(seed: int, k: int) -> int:
    digest = hashlib.sha256(f"{seed}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little")
