"""The model runner: one scheduled step -> model inputs -> forward -> sampled token ids.

It owns what a step needs besides the schedule: the model, its KV cache, the step's input buffer
(one host-to-device copy), the CUDA graphs of its steps (on a GPU: decode steps for any model,
mixed steps for models with varlen attention) and the sampler. The model's contract is explicit
(`StepModel`): its dtype, device, row multiple and varlen tile size, and
forward(token_ids, layout, kv_cache) -> fp32 logits of the layout's logit rows.
The sampler returns each token and, for requests that ask, its logprobs from those logits.
"""
from __future__ import annotations

import time
from typing import Optional, Protocol

import torch

from .batch import HostToDevice, build_step
from .config import GemmaConfig
from .graphs import DecodeGraphs, MixedGraphs
from .kv_cache import PagedKVCache
from .model import StepLayout
from .sampling import SampledTokens, SamplingRow, sample_with_logprobs
from .scheduler import SchedulerOutput
from .step_times import StepTimes


class StepModel(Protocol):
    cfg: GemmaConfig
    dtype: torch.dtype
    device: torch.device
    row_multiple: int  # token rows a step must be padded to a multiple of (FP8 GEMMs: 8)
    # Tokens per tile of the model's varlen attention kernel, which takes a whole mixed step's
    # VarlenLayout in one call per layer; None: attention by groups (batch.build_step).
    tile_rows: Optional[int]

    def __call__(self, token_ids: torch.Tensor, layout: StepLayout, kv_cache: PagedKVCache) -> torch.Tensor: ...


class ModelRunner:
    def __init__(self, model: StepModel, kv_cache: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int,
                 max_len: int, cuda_graphs: bool = True):
        self.model, self.kv_cache, self.device = model, kv_cache, model.device
        self._windows = {layer.sliding_window for layer in model.cfg.layers}
        self._uploader = HostToDevice(self.device)
        self._limits = (max_num_seqs, max_len)
        # On a GPU, decode-only steps replay captured graphs; so do mixed steps of models with varlen
        # attention (their inputs have fixed shapes per token bucket). Other steps run eagerly.
        graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = DecodeGraphs(model) if graphs else None
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if self.device.type == "cuda" else []
        self.mixed_graphs = MixedGraphs(model, kv_cache.block_size, max_num_seqs, max_num_batched_tokens, max_len) \
            if graphs and model.tile_rows is not None else None

    def warm_up(self) -> None:
        """Capture every graph that steps within the runner's limits can reach, before serving, so
        no request pays for a capture."""
        if self.graphs is not None:
            self.graphs.capture_all(self.kv_cache, *self._limits)
        if self.mixed_graphs is not None:
            self.mixed_graphs.capture_all(self.kv_cache)

    def execute(self, output: SchedulerOutput, times: StepTimes) -> SampledTokens:
        """The next token of each chunk that needs logits (and its logprobs, if asked), in schedule order.
        Adds the step's phases to `times`."""
        start = time.perf_counter()
        token_ids, layout = build_step([s.chunk for s in output.chunks], self.kv_cache.block_size, self._windows,
                                       self.device, self._uploader, self.model.tile_rows)
        prepared = time.perf_counter()
        if self._events:
            self._events[0].record()
        logits = self._forward(token_ids, layout)
        if self._events:
            self._events[1].record()
        launched = time.perf_counter()
        rows = [SamplingRow(s.seq.params, s.seq.generator, s.seq.token_ids, s.seq.num_output_tokens,
                            s.seq.eos_token_ids) for s in output.chunks if s.needs_logits]
        sampled = sample_with_logprobs(logits, rows) if rows else SampledTokens([], [])
        if self._events:  # the sampler read the ids back: the step's GPU work is done
            self._events[1].synchronize()
            times.gpu_forward_s += self._events[0].elapsed_time(self._events[1]) / 1e3
        times.steps += 1
        times.mixed_steps += any(len(s.chunk.token_ids) > 1 for s in output.chunks)
        times.prepare_s += prepared - start
        times.forward_s += launched - prepared
        times.sample_s += time.perf_counter() - launched
        return sampled

    def _forward(self, token_ids: torch.Tensor, layout: StepLayout) -> torch.Tensor:
        for graphs in (self.graphs, self.mixed_graphs):
            if graphs is not None and graphs.can_run(token_ids, layout):
                return graphs.run(token_ids, layout, self.kv_cache)
        return self.model(token_ids, layout, self.kv_cache)
