"""The model runner: one scheduled step -> model inputs -> forward -> sampled token ids.

It owns what a step needs besides the schedule: the model, its KV cache, the step's input buffer
(one host-to-device copy), the CUDA graphs of decode steps (on a GPU, for any model) and the
sampler. The model's contract is explicit (`StepModel`): its dtype, device and row multiple, and
forward(token_ids, layout, kv_cache) -> fp32 logits of the layout's logit rows.
The sampler returns each token and, for requests that ask, its logprobs from those logits.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .batch import HostToDevice, build_step
from .config import GemmaConfig
from .graphs import DecodeGraphs
from .kv_cache import PagedKVCache
from .model import StepLayout
from .sampling import SampledTokens, SamplingRow, sample_with_logprobs
from .scheduler import SchedulerOutput


class StepModel(Protocol):
    cfg: GemmaConfig
    dtype: torch.dtype
    device: torch.device
    row_multiple: int  # token rows a step must be padded to a multiple of (FP8 GEMMs: 8)

    def __call__(self, token_ids: torch.Tensor, layout: StepLayout, kv_cache: PagedKVCache) -> torch.Tensor: ...


class ModelRunner:
    def __init__(self, model: StepModel, kv_cache: PagedKVCache, cuda_graphs: bool = True):
        self.model, self.kv_cache, self.device = model, kv_cache, model.device
        self._windows = {layer.sliding_window for layer in model.cfg.layers}
        self._uploader = HostToDevice(self.device)
        # Decode-only steps replay captured graphs on a GPU; every other step runs the model eagerly.
        self.graphs = DecodeGraphs(model) if cuda_graphs and self.device.type == "cuda" else None
        self._forward = self.graphs or model

    def warm_up(self, max_batch: int, max_len: int) -> None:
        """Capture the decode graphs that steps of up to `max_batch` sequences and `max_len` tokens
        can reach, before serving, so no request pays for a capture."""
        if self.graphs is not None:
            self.graphs.capture_all(self.kv_cache, max_batch, max_len)

    def execute(self, output: SchedulerOutput) -> SampledTokens:
        """The next token of each chunk that needs logits (and its logprobs, if asked), in schedule order."""
        token_ids, layout = build_step([s.chunk for s in output.chunks], self.kv_cache.block_size, self._windows,
                                       self.device, self._uploader)
        logits = self._forward(token_ids, layout, self.kv_cache)
        rows = [SamplingRow(s.seq.params, s.seq.generator, s.seq.token_ids, s.seq.num_output_tokens,
                            s.seq.eos_token_ids) for s in output.chunks if s.needs_logits]
        return sample_with_logprobs(logits, rows) if rows else SampledTokens([], [])
