"""The model runner: one scheduled step -> model inputs -> forward -> sampled token ids.

It owns what a step needs besides the schedule: the model, its KV cache, the step's input buffer
(one host-to-device copy), the CUDA graphs of its steps (on a GPU: decode steps for any model,
mixed steps for models whose attention backend has a varlen kernel) and the sampler. The model's
contract is explicit (`StepModel`): its dtype, device, row multiple, its attention backend (which
lays each step out), and forward(token_ids, layout, kv_cache) -> fp32 logits of the layout's logit rows.
Rows of constrained sequences (structured outputs) get their grammar's mask on those logits; the
sampler then returns each token and, for requests that ask, its logprobs from them. A verify chunk
(speculative decoding: a sequence's last token and its drafts) is laid out like a prefill chunk and
has a logit row per draft and one more, each sampled as the one-token step at its position would
be; the sampler accepts a prefix of the drafts (backend/sampling.py).

`logits(chunks)` runs the model alone, without a schedule or a sampler: a draft model proposing
(backend/draft_model.py) picks its tokens from those logits, and its decodes are fed the previous
pick on the device (a token -1 - i in a chunk is row i of the tensor given).

`launch(output)` queues the whole step (input copy, forward, sampler, the copy of the sampled ids to
the host) without waiting for the device; `complete(step)` waits for its ids. In between, the engine
can launch the next step: a decode of a token still in flight reads it from the previous step's
sampled ids on the device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from .attention import AttentionBackend
from .attention.layout import StepLayout
from .batch import HostToDevice, SeqChunk
from .config import GemmaConfig
from .grammar import mask_logits
from .graphs import DecodeGraphs, MixedGraphs
from .kv_cache import PagedKVCache
from .sampling import SampledOnDevice, SampledTokens, SamplingRow, early_stops
from .scheduler import ScheduledChunk, SchedulerOutput
from .step_times import StepTimes


class StepModel(Protocol):
    cfg: GemmaConfig
    dtype: torch.dtype
    device: torch.device
    row_multiple: int  # token rows a step must be padded to a multiple of (FP8 GEMMs: 8)
    attention: AttentionBackend  # chosen when the model was built: lays out each step, attends

    def __call__(self, token_ids: torch.Tensor, layout: StepLayout, kv_cache: PagedKVCache) -> torch.Tensor: ...


class ModelRunner:
    def __init__(self, model: StepModel, kv_cache: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int,
                 max_len: int, cuda_graphs: bool = True, num_speculative_tokens: int = 0):
        self.model, self.kv_cache, self.device = model, kv_cache, model.device
        self._uploader = HostToDevice(self.device)
        self._limits = (max_num_seqs, max_len)
        # On a GPU, decode-only steps replay captured graphs; so do mixed steps of models whose attention
        # is one varlen kernel call (their inputs have fixed shapes per token bucket). Other steps run eagerly.
        graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = DecodeGraphs(model) if graphs else None
        self._spare_events: list = []
        # A verify chunk needs logits for each of its 1 + k rows.
        self.mixed_graphs = MixedGraphs(model, kv_cache.block_size, max_num_seqs, max_num_batched_tokens, max_len,
                                        max_logit_rows=max_num_seqs * (1 + num_speculative_tokens)) \
            if graphs and model.attention.tile_rows is not None else None

    def warm_up(self) -> None:
        """Capture every graph that steps within the runner's limits can reach, before serving, so
        no request pays for a capture."""
        if self.graphs is not None:
            self.graphs.capture_all(self.kv_cache, *self._limits)
        if self.mixed_graphs is not None:
            self.mixed_graphs.capture_all(self.kv_cache)

    def launch(self, output: SchedulerOutput, previous: Optional["StepInFlight"], times: StepTimes) -> "StepInFlight":
        """Start the step: lay it out, run the model and the sampler, and start copying the sampled
        ids to the host, without waiting for the device. A decode of a token still in flight (a
        `fed_token`) takes it from `previous`, the step launched just before, on the device."""
        start = time.perf_counter()
        chunks = [s.chunk for s in output.chunks]
        token_ids, layout = self.model.attention.build_step(chunks, self.kv_cache.block_size, self._uploader)
        if output.feeds_in_flight:
            token_ids = fill_fed(token_ids, previous.sampled.token_ids)
        prepared = time.perf_counter()
        events = self._events() if self.device.type == "cuda" else None
        if events:
            events[0].record()
        logits = self._forward(token_ids, layout)
        if events:
            events[1].record()
        launched = time.perf_counter()
        samplers = output.samplers
        if any(s.seq.grammar is not None for s in samplers):
            mask_logits(logits, [s.seq.grammar for s in samplers for _ in range(s.chunk.num_logit_rows)])
        if not samplers:
            sampled = None
        elif all(s.seq.params.samples_plainly and not s.chunk.num_drafts for s in samplers):
            # Greedy serving's steady state: no per-row objects (at 256 sequences they were ~10% of this
            # thread), min_tokens too (fixed-length benchmark runs send it for every request); the
            # min_tokens test comes first so the requests without it pay one comparison.
            under_min_tokens = {i: early_stops(s.seq.params, s.num_output_tokens, s.seq.eos_token_ids)
                                for i, s in enumerate(samplers) if s.num_output_tokens < s.seq.params.min_tokens}
            sampled = SampledOnDevice(logits, None, early_stops=under_min_tokens)
        else:
            rows = [row for s in samplers for row in sampling_rows(s)]
            drafts = [s.chunk.token_ids[len(s.chunk.token_ids) - s.chunk.num_drafts:] for s in samplers] \
                if any(s.chunk.num_drafts for s in samplers) else None
            sampled = SampledOnDevice(logits, rows, drafts)
        times.steps += 1
        times.mixed_steps += any(len(c.token_ids) > 1 for c in chunks)
        times.prepare_s += prepared - start
        times.forward_s += launched - prepared
        times.sample_s += time.perf_counter() - launched
        return StepInFlight(output, sampled, events)

    def logits(self, chunks: list[SeqChunk], fed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's fp32 logits of the chunks' logit rows (graphs replayed as for a step), with
        each token -1 - i taken from fed[i] on the device."""
        token_ids, layout = self.model.attention.build_step(chunks, self.kv_cache.block_size, self._uploader)
        if fed is not None:
            token_ids = fill_fed(token_ids, fed)
        return self._forward(token_ids, layout)

    def complete(self, step: "StepInFlight", times: StepTimes) -> SampledTokens:
        """Wait for a launched step's sampled ids (and logprobs) on the host."""
        start = time.perf_counter()
        sampled = step.sampled.result() if step.sampled is not None else SampledTokens([], [])
        if step.events:  # the sampler's copy is done, so is the forward
            step.events[1].synchronize()
            times.gpu_forward_s += step.events[0].elapsed_time(step.events[1]) / 1e3
            self._spare_events.append(step.events)
        times.wait_s += time.perf_counter() - start
        return sampled

    def _events(self) -> list:
        """A pair of timing events; pairs come back once their step is complete."""
        if self._spare_events:
            return self._spare_events.pop()
        return [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def _forward(self, token_ids: torch.Tensor, layout: StepLayout) -> torch.Tensor:
        for graphs in (self.graphs, self.mixed_graphs):
            if graphs is not None and graphs.can_run(token_ids, layout):
                return graphs.run(token_ids, layout, self.kv_cache)
        return self.model(token_ids, layout, self.kv_cache)


def sampling_rows(scheduled: ScheduledChunk) -> list[SamplingRow]:
    """The sampler's rows of a chunk that needs logits: one, or for a verify chunk one per draft and
    one more, row j as the one-token step after draft j would see it (its drafts count as tokens so
    far)."""
    seq, chunk = scheduled.seq, scheduled.chunk
    params, history = seq.params, seq.token_ids
    if not chunk.num_drafts:  # the common case, first (at 256 sequences the loop below shows in a step's host time)
        return [SamplingRow(params, seq.generator, history, scheduled.num_output_tokens, seq.eos_token_ids)]
    drafts = chunk.token_ids[len(chunk.token_ids) - chunk.num_drafts:]
    rows = []
    for j in range(chunk.num_drafts + 1):
        if j and params.reads_token_history:  # only the penalties and bad words read the history
            history = seq.token_ids + drafts[:j]
        rows.append(SamplingRow(params, seq.generator, history, scheduled.num_output_tokens + j, seq.eos_token_ids))
    return rows


@dataclass
class StepInFlight:
    """A launched step: what was scheduled, its sampler output still on the device, and the events
    timing its forward (GPU)."""
    output: SchedulerOutput
    sampled: Optional[SampledOnDevice]
    events: Optional[list]


def fill_fed(token_ids: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
    """`token_ids` with each fed_token(i) (-1 - i) replaced by fed[i], on the device (no wait)."""
    rows = (-1 - token_ids).clamp_min(0)
    return torch.where(token_ids < 0, fed[rows], token_ids)
