"""Multi-turn chat with and without prefix caching: the time to first token of each turn.

A conversation's every turn re-sends the whole history. With prefix caching the engine reuses the
K/V of the turns before, so a late turn's prefill covers only its new message; without it, the
whole history is computed again. Both engines run the same conversations in the same process.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

from .stats import median, ratio

TURNS = 4
# Sentences the user messages are made of: plain prose, so the history tokenizes like a real chat.
_SENTENCES = (
    "The harbour town wakes before dawn, when the fishing boats slip out past the breakwater.",
    "Merchants open their stalls along the quay and argue about the price of salt and rope.",
    "A lighthouse keeper writes the weather into a ledger that is older than anyone in town.",
    "Children chase gulls across the square while the bell of the chapel strikes the hour.",
    "In the afternoon the wind turns, and the smell of tar and seaweed drifts up the hill.",
    "Travellers arrive on the coast road with stories of cities, mountains and distant rivers.",
)


_QUESTIONS = ("Who is the most important person in the story so far?", "Where could the travellers be going?",
              "What do you think happens next? Answer in one sentence.")


def user_message(conversation: int, turn: int, num_sentences: int) -> str:
    """The first turn shares a long story (the history later turns carry); later turns ask short questions."""
    if turn > 0:
        return _QUESTIONS[(turn - 1) % len(_QUESTIONS)]
    lines = [f"Conversation {conversation}. Read my story, then answer my questions about it:"]
    lines += [f"{i + 1}. {_SENTENCES[i % len(_SENTENCES)]}" for i in range(num_sentences)]
    return "\n".join(lines)


def chat(engine, conversation: int, max_tokens: int, num_sentences: int) -> list[dict]:
    """One conversation of TURNS turns, greedy; per turn: prompt tokens, cached tokens, TTFT."""
    from backend.params import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    history: list[dict] = []
    turns = []
    for turn in range(TURNS):
        history.append({"role": "user", "content": user_message(conversation, turn, num_sentences)})
        text = engine.tokenizer.apply_chat_template(history)
        prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False)  # the template has <bos>
        start = time.perf_counter()
        ttft, reply, last = None, [], None
        for out in engine.submit(prompt_ids, params):
            if ttft is None and out.token_ids:
                ttft = time.perf_counter() - start
            reply.append(out.text)
            last = out
        history.append({"role": "assistant", "content": "".join(reply)})
        turns.append({"turn": turn + 1, "prompt_tokens": last.num_prompt_tokens,
                      "cached_tokens": last.num_cached_tokens, "ttft_ms": 1e3 * ttft})
    return turns


def run(engines: dict, reps: int, max_tokens: int = 16, num_sentences: int = 64,
        progress: Callable[[str], None] = lambda s: None) -> Iterator[dict]:
    """`engines`: name -> Engine (e.g. prefix caching on / off). Each repetition runs a new
    conversation on every engine, alternating which goes first."""
    names = list(engines)
    for rep in range(reps + 1):  # repetition 0 warms up and is not recorded
        for name in (names if rep % 2 == 0 else names[::-1]):
            progress(f"chat: {'warm-up' if rep == 0 else f'rep {rep}/{reps}'}: {TURNS} turns -> {name}")
            turns = chat(engines[name], conversation=rep, max_tokens=max_tokens, num_sentences=num_sentences)
            if rep > 0:
                for t in turns:
                    yield {"type": "chat", "system": name, "rep": rep, **t}


def summary(records: list[dict], cached: str, uncached: str) -> dict:
    """Median TTFT of the last turn per system, and how many times faster prefix caching makes it."""
    def last_turn(system, key):
        return median([r[key] for r in records if r["system"] == system and r["turn"] == TURNS])
    with_cache, without = last_turn(cached, "ttft_ms"), last_turn(uncached, "ttft_ms")
    return {"chat_turn4_prompt_tokens": last_turn(cached, "prompt_tokens"),
            "chat_turn4_cached_tokens": last_turn(cached, "cached_tokens"),
            "chat_turn4_ttft_ms": {cached: with_cache, uncached: without},
            "prefix_cache_ttft_speedup": ratio(without, with_cache)}
