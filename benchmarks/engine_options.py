"""The engine's command-line options, one set for every benchmark that builds an EngineConfig and
hands it to both an in-process engine and a server (through GEMMA_*: serving.server_env), so the
same flags mean the same engine in `benchmarks.run`, `benchmarks.load_grid` and `benchmarks.aiperf_run`."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional


def add_engine_options(parser: argparse.ArgumentParser, title: str,
                       max_num_seqs_default: Optional[int] = None) -> None:
    engine = parser.add_argument_group(title)
    engine.add_argument("--checkpoint", type=Path, help="HF checkpoint directory (default: the packaged 270M)")
    engine.add_argument("--engine", choices=("auto", "te", "torch"))
    engine.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
    engine.add_argument("--max-num-seqs", type=int, default=max_num_seqs_default,
                        help="sequences decoded together (at least the top concurrency)")
    engine.add_argument("--max-num-batched-tokens", type=int, help="tokens one step may hold (vLLM resolves 2048)")
    engine.add_argument("--max-model-len", type=int, help="the longest sequence (fewer CUDA graphs where shorter)")
    engine.add_argument("--kv-cache-bytes", type=int)
    engine.add_argument("--gpu-memory-utilization", type=float,
                        help="vLLM's rule: the KV cache is this share of the device's memory less the weights "
                             "(instead of --kv-cache-bytes; docs/deploy.md)")
    engine.add_argument("--async-scheduling", choices=("auto", "on", "off"),
                        help="launch step N+1 before step N's tokens are back (auto: on for CUDA)")


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of dataclass `cls` that `args` sets (None: not given, the dataclass's default)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def engine_config(args: argparse.Namespace):
    """The one EngineConfig of the run, with the checkpoint resolved so every target loads one path."""
    from backend.loader import resolve_checkpoint
    from backend.params import EngineConfig
    return EngineConfig(**{**given(args, EngineConfig), "checkpoint": str(resolve_checkpoint(args.checkpoint))})
