"""What every entry point (the Triton model, the CLI, the benchmarks, the tests) does before an engine
starts: resolve the checkpoint (the configured directory, or the packaged Gemma 3 270M, converted and
self-checked once: backend/default_model.py) and load its tokenizer through the start checks
(backend/self_check.py). The engine itself only ever sees a resolved directory.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from .default_model import ensure_default_checkpoint
from .engine import Engine
from .params import EngineConfig
from .self_check import load_checked_tokenizer


def resolve_checkpoint(checkpoint: Optional[str]) -> Path:
    """The checkpoint directory to load: the configured one, or the packaged Gemma 3 270M."""
    return Path(checkpoint) if checkpoint else ensure_default_checkpoint()


def start_engine(config: EngineConfig, engine_process: bool = False, shared_as: Optional[str] = None) -> Engine:
    """An engine serving `config`'s checkpoint, its core on a thread of this process or, with
    `engine_process`, in a process of its own (backend/engine_process.py), which with `shared_as`
    every engine started under that name shares (backend/engine_fronts.py)."""
    path = resolve_checkpoint(config.checkpoint)
    tokenizer = load_checked_tokenizer(path)
    return Engine(dataclasses.replace(config, checkpoint=str(path)), tokenizer, engine_process, shared_as)
