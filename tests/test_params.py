"""backend/params.py: the engine's configuration is checked once, where it is made."""
from __future__ import annotations

import dataclasses

import pytest

from backend.params import EngineConfig, blocks_for


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "float64", "dtype must be one of auto, float32, bfloat16, float16, not 'float64'"),
    ("engine", "vllm", "engine must be one of auto, te, torch, not 'vllm'"),
    ("fp8_recipe", "mxfp8", "fp8_recipe must be one of delayed, current, block, not 'mxfp8'"),
    ("async_scheduling", "yes", "async_scheduling must be one of auto, on, off, not 'yes'"),
    ("device", "gpu", "device must be auto, cpu, cuda or cuda:N, not 'gpu'"),
    ("device", "cuda:x", "device must be auto, cpu, cuda or cuda:N, not 'cuda:x'"),
    ("max_num_seqs", 0, "max_num_seqs must be >= 1, not 0"),
    ("kv_cache_bytes", -1, "kv_cache_bytes must be >= 1, not -1"),
    ("max_queue_size", -1, "max_queue_size must be >= 0, not -1"),
    ("gpu_memory_utilization", 0, "gpu_memory_utilization must be in (0, 1] (or unset), not 0"),
    ("gpu_memory_utilization", 1.5, "gpu_memory_utilization must be in (0, 1] (or unset), not 1.5"),
    ("gpu_memory_utilization", float("nan"), "gpu_memory_utilization must be in (0, 1] (or unset), not nan"),
])
def test_a_wrong_setting_is_refused_naming_it(field, value, message):
    with pytest.raises(ValueError) as refused:
        EngineConfig(**{field: value})
    assert str(refused.value) == message


def test_a_replaced_setting_is_checked_too():
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        dataclasses.replace(EngineConfig(), block_size=0)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:3"])
def test_every_device_the_engine_resolves_is_accepted(device):
    assert EngineConfig(device=device).device == device


def test_blocks_for_rounds_up_to_whole_blocks():
    assert [blocks_for(n, 16) for n in (1, 16, 17, 32, 33)] == [1, 1, 2, 2, 3]


@pytest.mark.parametrize("utilization", [None, 0.05, 0.9, 1.0])
def test_gpu_memory_utilization_takes_a_share_up_to_the_whole_device(utilization):
    assert EngineConfig(gpu_memory_utilization=utilization).gpu_memory_utilization == utilization
