"""One engine step's work as the model's attention backend receives it: each scheduled sequence's
new tokens (`SeqChunk`), and the one host-to-device copy of a step's small integer inputs
(`HostToDevice`). The backend lays the chunks out (backend/attention/layout.py).
"""
from __future__ import annotations

import array
from dataclasses import dataclass

import torch


def fed_token(row: int) -> int:
    """A chunk's token that is row `row` of a tensor of token ids already on the device (the sampled
    ids of the step in flight, or a draft model's previous picks), filled in there without a wait."""
    return -1 - row


@dataclass(slots=True)
class SeqChunk:
    """`token_ids` are the sequence's tokens at positions [start, start + len) this step (a negative one
    is a `fed_token`). A chunk that
    needs logits needs them for its last token; a verify chunk (speculative decoding) ends with
    `num_drafts` proposed tokens and needs logits for them too: its last 1 + num_drafts rows."""
    token_ids: list[int]
    start: int
    block_table: list[int]
    needs_logits: bool
    num_drafts: int = 0

    @property
    def num_logit_rows(self) -> int:
        return 1 + self.num_drafts if self.needs_logits else 0


class HostToDevice:
    """A step's small integer inputs, gathered into one host buffer (pinned on CUDA) and sent to the
    device in one copy. Each step takes a fresh buffer from torch's pinned-memory cache, which hands
    a buffer out again only once its copy is done: the next step is built while this one's copy may
    still be queued behind the step before."""

    def __init__(self, device: torch.device | str, pinned: bool = True):
        self.device = torch.device(device)
        self.pinned = pinned and self.device.type == "cuda"

    def upload(self, parts: list[list[int]]) -> list[torch.Tensor]:
        """Each list of ints as a 1-D long tensor on the device."""
        sizes = [len(p) for p in parts]
        # An array('q') takes the ints at C speed (torch.tensor of a list walks them in Python: twice as
        # slow); fromlist reads each list directly, half the time of an iterator over all of them.
        ints = array.array("q")
        for part in parts:
            ints.fromlist(part)
        flat = torch.frombuffer(ints, dtype=torch.long)
        if self.pinned:
            flat = flat.pin_memory()
        # Not pinned: the CPU (no copy at all), or a one-off layout.
        return list(flat.to(self.device, non_blocking=True).split(sizes))
