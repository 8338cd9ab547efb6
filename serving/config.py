"""The Triton model's settings from what Triton hands `initialize`: config.pbtxt's parameters (each
overridable by GEMMA_<KEY>) and the instance's kind and device, mapped to an EngineConfig. Plain
functions, so the mapping is tested without Triton and without building an engine.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where an EngineConfig is built, not with this module
    from backend.engine import EngineConfig


@dataclass(frozen=True)
class ModelSettings:
    engine: EngineConfig
    max_prompt_bytes: int  # the serving side's own limit (not an engine setting)


def model_settings(args: dict[str, str]) -> ModelSettings:
    """Settings for one model instance from Triton's `initialize` arguments. A GPU instance (Triton
    places one per GPU with instance_group KIND_AUTO or KIND_GPU) runs its engine on its own GPU,
    whatever GEMMA_DEVICE says."""
    params = model_parameters(json.loads(args["model_config"]))
    if args["model_instance_kind"] == "GPU":
        params["device"] = f"cuda:{args['model_instance_device_id']}"
    max_prompt_bytes = int(params.pop("max_prompt_bytes"))
    return ModelSettings(engine_config(params), max_prompt_bytes)


def model_parameters(model_config: dict) -> dict[str, str]:
    """config.pbtxt parameters, each overridden by the environment variable GEMMA_<KEY>."""
    return {key: os.environ.get(f"GEMMA_{key.upper()}", value["string_value"])
            for key, value in model_config.get("parameters", {}).items()}


def engine_config(params: dict[str, str]) -> EngineConfig:
    """EngineConfig from string parameters named like its fields; empty values keep the defaults."""
    from backend.engine import EngineConfig

    values = {}
    for f in dataclasses.fields(EngineConfig):
        text = params.pop(f.name, "").strip()
        if text:
            kind = type(f.default)
            values[f.name] = (text.lower() in ("1", "true", "yes") if kind is bool
                              else int(text) if kind is int else text)
    if params:
        raise ValueError(f"unknown model parameters {sorted(params)}")
    return EngineConfig(**values)
