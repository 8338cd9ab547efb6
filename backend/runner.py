"""The model runner: one scheduled step -> model inputs -> forward -> sampled token ids.

It owns what a step needs besides the schedule: the model, its KV cache and the sampler. The
model's contract is explicit (`StepModel`): its dtype, a warm-up called once the cache exists
(where the TransformerEngine model captures its CUDA graphs), and
forward(token_ids, layout, kv_cache) -> fp32 logits of the rows that sample.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .batch import HostToDevice, build_step
from .config import GemmaConfig
from .kv_cache import PagedKVCache
from .model import StepLayout
from .sampling import SamplingRow, sample
from .scheduler import SchedulerOutput


class StepModel(Protocol):
    cfg: GemmaConfig
    dtype: torch.dtype

    def warm_up(self, kv_cache: PagedKVCache, max_batch: int, max_len: int) -> None: ...

    def __call__(self, token_ids: torch.Tensor, layout: StepLayout, kv_cache: PagedKVCache) -> torch.Tensor: ...


class ModelRunner:
    def __init__(self, model: StepModel, kv_cache: PagedKVCache, device: torch.device):
        self.model, self.kv_cache, self.device = model, kv_cache, device
        self._windows = {layer.sliding_window for layer in model.cfg.layers}
        self._uploader = HostToDevice(device)

    def execute(self, output: SchedulerOutput) -> list[int]:
        """The next token of each chunk that needs logits, in schedule order."""
        token_ids, layout = build_step([s.chunk for s in output.chunks], self.kv_cache.block_size, self._windows,
                                       self.device, self._uploader)
        logits = self.model(token_ids, layout, self.kv_cache)
        rows = [SamplingRow(s.seq.params, s.seq.generator, s.seq.token_ids, s.seq.num_output_tokens,
                            s.seq.eos_token_ids) for s in output.chunks if s.needs_logits]
        return sample(logits, rows) if rows else []
