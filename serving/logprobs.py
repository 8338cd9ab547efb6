"""The engine's TokenLogprobs -> the `logprobs` output's JSON, in the vLLM backend's layout.

Per generated token, a map from token id (a string: JSON keys are) to {"logprob", "rank",
"decoded_token"}: the sampled token first, then the `logprobs` most likely tokens by rank (the
sampled one once, if it is among them), as vLLM's Logprob dicts serialise. Token text is decoded
here, where the tokenizer is, so clients need none.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

from backend.params import TokenLogprobs
from backend.tokenizer import Tokenizer

# A logprob that underflowed to -inf is sent as this (as vLLM does): JSON has no infinity.
LOWEST_LOGPROB = -9999.0


def logprobs_json(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprobs]) -> str:
    ids = sorted({lp.token_id for lp in logprobs} | {i for lp in logprobs for i in lp.top_ids})
    text_of = dict(zip(ids, tokenizer.token_texts(ids)))  # one tokenizer call for the whole response

    def entry(token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob if math.isfinite(logprob) else LOWEST_LOGPROB, "rank": rank,
                "decoded_token": text_of[token_id]}

    positions = []
    for lp in logprobs:
        position = {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank)}
        for rank, (token_id, logprob) in enumerate(zip(lp.top_ids, lp.top_logprobs), start=1):
            position.setdefault(str(token_id), entry(token_id, logprob, rank))
        positions.append(position)
    return json.dumps(positions)
