"""The engine's TokenLogprobs -> the `logprobs` output tensor's JSON text (gemma_protocol.OUTPUTS).

One entry per generated token: {"token_id", "token", "logprob", "top_logprobs": [{"token_id",
"token", "logprob"}, ...]}. Token text is decoded here, where the tokenizer is, so clients need none.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

from backend.sampling import TokenLogprobs
from backend.tokenizer import Tokenizer

# A logprob that underflowed to -inf is sent as this (as vLLM does): JSON has no infinity.
LOWEST_LOGPROB = -9999.0


def logprobs_json(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprobs]) -> str:
    ids = sorted({lp.token_id for lp in logprobs} | {i for lp in logprobs for i in lp.top_ids})
    text_of = dict(zip(ids, tokenizer.token_texts(ids)))  # one tokenizer call for the whole response

    def entry(token_id: int, logprob: float) -> dict:
        return {"token_id": token_id, "token": text_of[token_id],
                "logprob": logprob if math.isfinite(logprob) else LOWEST_LOGPROB}

    return json.dumps([{**entry(lp.token_id, lp.logprob),
                        "top_logprobs": [entry(i, v) for i, v in zip(lp.top_ids, lp.top_logprobs)]}
                       for lp in logprobs])
