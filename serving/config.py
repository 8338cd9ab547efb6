"""The Triton model's settings from what Triton hands `initialize`: config.pbtxt's parameters (each
overridable by GEMMA_<KEY>) and the instance's kind and device, mapped to an EngineConfig. Plain
functions, so the mapping is tested without Triton and without building an engine. Also the stub
process's own settings, made before torch is imported.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass

from backend.params import EngineConfig


# A dead engine process is started again after each of these waits, until one start succeeds; after
# the last failed start the model stays unavailable (a start that fails that often will not recover):
# its state reads "failed", and the liveness probe has the orchestrator restart the server.
ENGINE_RESTART_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0)
# Threads of the stub that send responses (model.py's _Responder). On the H100 grid of 2026-12-07 four
# lengthened TTFT at nearly every server point against one (docs/benchmarks.md).
RESPONDER_THREADS = 1
# How the histograms are exported (serving/metrics.py): the first is the default.
HISTOGRAMS = ("counters", "native")


@dataclass(frozen=True)
class ModelSettings:
    engine: EngineConfig
    max_prompt_bytes: int  # the serving side's own limit (not an engine setting)
    engine_process: bool  # the engine in a process of its own (backend/engine_process.py), not a thread of the stub
    # The vLLM backend's ENABLE_VLLM_HEALTH_CHECK: an engine that died or stopped answering unloads the
    # model, so Triton reports it not ready (model control mode explicit only).
    unload_when_unhealthy: bool = False
    engine_restart_delays_s: tuple[float, ...] = ENGINE_RESTART_DELAYS_S
    responder_threads: int = RESPONDER_THREADS
    histograms: str = HISTOGRAMS[0]


def model_settings(args: dict[str, str]) -> ModelSettings:
    """Settings for one model instance from Triton's `initialize` arguments. A GPU instance (Triton
    places one per GPU with instance_group KIND_AUTO or KIND_GPU) runs its engine on its own GPU,
    whatever GEMMA_DEVICE says."""
    params = model_parameters(json.loads(args["model_config"]))
    if args["model_instance_kind"] == "GPU":
        params["device"] = f"cuda:{args['model_instance_device_id']}"
    max_prompt_bytes = int(params.pop("max_prompt_bytes"))
    engine_process = _true(params.pop("engine_process", "true"), empty=True)
    unload_when_unhealthy = _true(params.pop("ENABLE_VLLM_HEALTH_CHECK", "false"), empty=False)
    restart_delays = engine_restart_delays(params.pop("engine_restart_delays_s", ""))
    responders = responder_threads(params.pop("responder_threads", ""))
    histograms = histograms_setting(params.pop("histograms", ""))
    return ModelSettings(engine_config(params), max_prompt_bytes, engine_process, unload_when_unhealthy,
                         restart_delays, responders, histograms)


def shared_engine_name(args: dict[str, str], engine: EngineConfig) -> str:
    """The name under which one server's instances of one model on one device find their shared
    engine process (backend/engine_fronts.py): the server (the stubs' parent process), the model,
    its version and the device. Instances on other devices, and other servers, get engines of their own."""
    return f"gemma-triton/{os.getppid()}/{args['model_name']}/{args['model_version']}/{engine.device}"


def histograms_setting(text: str) -> str:
    """How the histograms are exported; empty: the default."""
    text = text.strip().lower() or HISTOGRAMS[0]
    if text not in HISTOGRAMS:
        raise ValueError(f"histograms must be one of {', '.join(HISTOGRAMS)}, got {text!r}")
    return text


def responder_threads(text: str) -> int:
    """How many threads send responses; empty: the default."""
    text = text.strip()
    if not text:
        return RESPONDER_THREADS
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise ValueError(f"responder_threads must be a whole number from 1 to 64, got {text!r}")
    return int(text)


def engine_restart_delays(text: str) -> tuple[float, ...]:
    """"1,2,4,8,16": the seconds before each start of a fresh engine process; empty: the default."""
    if not text.strip():
        return ENGINE_RESTART_DELAYS_S
    try:
        delays = tuple(float(part) for part in text.split(","))
    except ValueError:
        delays = ()
    if not delays or not all(math.isfinite(d) and d >= 0 for d in delays):
        raise ValueError(f"engine_restart_delays_s must be seconds >= 0 separated by commas, one per restart "
                         f"attempt (e.g. '1,2,4,8,16'), got {text!r}")
    return delays


def _true(text: str, empty: bool) -> bool:
    text = text.strip().lower()
    return empty if not text else text in ("1", "true", "yes")


def model_parameters(model_config: dict) -> dict[str, str]:
    """config.pbtxt parameters, each overridden by the environment variable GEMMA_<KEY>."""
    return {key: os.environ.get(f"GEMMA_{key.upper()}", value["string_value"])
            for key, value in model_config.get("parameters", {}).items()}


def engine_config(params: dict[str, str]) -> EngineConfig:
    """EngineConfig from string parameters named like its fields; empty values keep the defaults."""
    values, hints = {}, typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        text = params.pop(f.name, "").strip()
        if text:
            # An Optional field's default is None: its kind is the annotation's other type.
            kind = type(f.default) if f.default is not None else typing.get_args(hints[f.name])[0]
            values[f.name] = (_true(text, empty=False) if kind is bool else int(text) if kind is int
                              else float(text) if kind is float else text)
    if params:
        raise ValueError(f"unknown model parameters {sorted(params)}")
    return EngineConfig(**values)


# The CPU engine's matmuls run on oneDNN (backend/model.py, prepare_for_cpu), which builds a kernel for
# every input shape and keeps it in two caches of 1,024 entries each (oneDNN's primitive cache and
# PyTorch's ideep cache), about 0.3 MB an entry. A server meets hundreds of distinct tokens-per-step
# counts, so the stub grew for thousands of requests and, once entries were evicted, kept growing by
# heap fragmentation (make soak: +13% after warm-up over 3,000 requests, rising every quarter).
# 128 entries hold every decode shape (batch 1-16 x 5 matmul kinds) and bound both caches near 80 MB
# (the same soak: +1.6%, flat over the last half); a miss costs 0.2-0.7 ms per matmul kind on 2
# cores, at most once per step of 60+ ms. docs/soak.md has the figures.
CPU_KERNEL_CACHE_ENTRIES = 128


def bound_cpu_kernel_caches() -> None:
    """Cap oneDNN's kernel caches; a value already in the environment wins. Call before torch is
    imported: each cache reads its capacity once."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(CPU_KERNEL_CACHE_ENTRIES))
