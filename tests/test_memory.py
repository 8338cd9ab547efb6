"""backend/memory.py: what the host and its memory cgroup leave, as the KV cache check sees it; the KV
cache sized by vLLM's gpu_memory_utilization rule, from plain numbers and through an engine; and the
weights' check against a GPU's free memory (backend/weights.py), which needs no GPU to be tested."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend import kv_cache, memory
from backend.config import GemmaConfig
from backend.kv_cache import PagedKVCache, bytes_per_block
from backend.loader import start_engine
from backend.params import EngineConfig, blocks_for
from backend.weights import CheckpointError, check_weights_fit, load_reference_model
from tests.tiny_models import write_checkpoint

GIB, MIB = 1 << 30, 1 << 20


def fake_machine(root: Path, mem_available: int, self_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A /proc (meminfo, self/cgroup) and a /sys/fs/cgroup holding `files` (path below the mount -> text)."""
    proc, cgroup = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       {64 * GIB // 1024} kB\nMemAvailable:   {mem_available // 1024} kB\n")
    (proc / "self" / "cgroup").write_text(self_cgroup)
    for path, text in files.items():
        (cgroup / path).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / path).write_text(text)
    return proc, cgroup


V1_LINES = "12:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n"


@pytest.mark.parametrize("self_cgroup, files, expected", [
    # cgroup v2 in a container (cgroup namespace: its cgroup is the mount's root): the limit's headroom
    ("0::/\n", {"memory.max": str(4 * GIB), "memory.current": str(3 * GIB)}, 1 * GIB),
    ("0::/\n", {"memory.max": "max", "memory.current": str(3 * GIB)}, 32 * GIB),  # no limit: MemAvailable
    ("0::/\n", {"memory.max": str(64 * GIB), "memory.current": str(1 * GIB)}, 32 * GIB),  # a limit above it
    ("0::/\n", {"memory.max": str(4 * GIB), "memory.current": str(5 * GIB)}, 0),  # over its limit (reclaiming)
    # v2 on a host (a systemd service): its own cgroup's limit, and a tighter one of an ancestor
    ("0::/system.slice/gemma.service\n", {"system.slice/gemma.service/memory.max": str(8 * GIB),
                                          "system.slice/gemma.service/memory.current": str(6 * GIB)}, 2 * GIB),
    ("0::/system.slice/gemma.service\n", {"system.slice/gemma.service/memory.max": "max",
                                          "system.slice/gemma.service/memory.current": str(6 * GIB),
                                          "system.slice/memory.max": str(10 * GIB),
                                          "system.slice/memory.current": str(9 * GIB)}, 1 * GIB),
    # v1: the memory hierarchy at <mount>/memory, mounted as the container's own cgroup (its path in
    # /proc/self/cgroup is the host's, absent in the container)
    (V1_LINES, {"memory/memory.limit_in_bytes": str(2 * GIB), "memory/memory.usage_in_bytes": str(512 * MIB)},
     1536 * MIB),
    (V1_LINES, {"memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
                "memory/memory.usage_in_bytes": str(512 * MIB)}, 32 * GIB),
    ("0::/\n", {}, 32 * GIB),  # no memory controller files (the host's root cgroup): MemAvailable
], ids=["v2-limit", "v2-max", "v2-limit-above-available", "v2-over-limit", "v2-service", "v2-ancestor-limit",
        "v1-limit", "v1-unlimited", "no-cgroup-files"])
def test_the_hosts_available_memory_is_the_least_of_memavailable_and_the_cgroups_headroom(
        tmp_path, self_cgroup, files, expected):
    proc, cgroup = fake_machine(tmp_path, 32 * GIB, self_cgroup, files)
    assert memory.host_available_bytes(proc, cgroup) == expected


def test_without_meminfo_the_cgroup_still_counts(tmp_path):
    proc, cgroup = fake_machine(tmp_path, 32 * GIB, "0::/\n", {"memory.max": str(GIB), "memory.current": "0"})
    (proc / "meminfo").unlink()
    assert memory.host_available_bytes(proc, cgroup) == GIB
    (proc / "self" / "cgroup").unlink()
    assert memory.host_available_bytes(proc, cgroup) is None


@pytest.mark.parametrize("self_cgroup, files, expected", [
    ("0::/\n", {"memory.max": str(4 * GIB), "memory.current": str(3 * GIB)}, 4 * GIB),  # the container's limit
    ("0::/\n", {"memory.max": "max", "memory.current": str(3 * GIB)}, 64 * GIB),  # no limit: MemTotal
    ("0::/\n", {"memory.max": str(128 * GIB), "memory.current": "0"}, 64 * GIB),  # a limit above MemTotal
    ("0::/system.slice/gemma.service\n", {"system.slice/gemma.service/memory.max": "max",
                                          "system.slice/memory.max": str(10 * GIB)}, 10 * GIB),  # an ancestor's
    (V1_LINES, {"memory/memory.limit_in_bytes": str(2 * GIB)}, 2 * GIB),
    (V1_LINES, {"memory/memory.limit_in_bytes": "9223372036854771712"}, 64 * GIB),  # v1's "no limit"
], ids=["v2-limit", "v2-max", "v2-limit-above-total", "v2-ancestor-limit", "v1-limit", "v1-unlimited"])
def test_the_hosts_total_memory_is_the_least_of_memtotal_and_the_cgroups_limit(tmp_path, self_cgroup, files,
                                                                               expected):
    proc, cgroup = fake_machine(tmp_path, 32 * GIB, self_cgroup, files)
    assert memory.host_total_bytes(proc, cgroup) == expected


def test_the_utilization_budget_is_that_share_of_the_total_less_what_the_process_uses():
    # vLLM's arithmetic: 0.9 of 80 GiB is 72 GiB; weights and the rest hold 8 GiB, the KV cache gets 64
    assert memory.utilization_budget(0.9, 80 * GIB, 8 * GIB, 79 * GIB, 2 * MIB, 4, "cuda:0") == \
        int(0.9 * 80 * GIB) - 8 * GIB
    assert memory.utilization_budget(1.0, 16 * GIB, 4 * GIB, None, MIB, 1, "cpu") == 12 * GIB  # free unknown


def test_a_utilization_that_leaves_less_than_one_sequence_is_refused_naming_the_numbers():
    budget = int(0.5 * GIB) - 500 * MIB  # 12 MiB: 6 blocks of 2 MiB, a sequence needs 8
    with pytest.raises(ValueError) as refused:
        memory.utilization_budget(0.5, GIB, 500 * MIB, GIB, 2 * MIB, 8, "cuda:0")
    assert str(refused.value) == (
        f"gpu_memory_utilization=0.5 of {GIB} bytes on cuda:0 is {GIB // 2} bytes, and this process already uses "
        f"{500 * MIB}: that leaves {budget} bytes for the KV cache, less than the 8 blocks of {2 * MIB} bytes one "
        f"sequence of max_model_len needs; raise gpu_memory_utilization or lower max_model_len")
    with pytest.raises(ValueError, match=f"leaves {-GIB // 2} bytes for the KV cache"):  # weights beyond the share
        memory.utilization_budget(0.5, GIB, GIB, GIB, 2 * MIB, 1, "cuda:0")
    assert memory.utilization_budget(0.5, GIB, 500 * MIB, GIB, 2 * MIB, 6, "cuda:0") == budget


def test_a_utilization_beyond_the_free_memory_is_refused():
    """Another process holds half the GPU: 0.9 of it cannot be had."""
    with pytest.raises(ValueError, match=rf"leaves {int(0.9 * 80 * GIB) - GIB} bytes for the KV cache, but only "
                                         rf"{39 * GIB} bytes are free on cuda:0 \(other processes, or this one's CUDA "
                                         rf"context, hold the rest\); lower gpu_memory_utilization"):
        memory.utilization_budget(0.9, 80 * GIB, GIB, 39 * GIB, 2 * MIB, 1, "cuda:0")


def test_an_engine_with_gpu_memory_utilization_gets_the_kv_cache_it_computes(servable_checkpoint, monkeypatch):
    """Readings fixed (a 1 GiB device of which the process holds 508 MiB): half of it leaves 4 MiB, whole
    blocks of which make the cache; the engine reports its bytes and blocks."""
    readings = {"total_memory_bytes": GIB, "used_memory_bytes": 508 * MIB, "free_memory_bytes": GIB}
    for name, value in readings.items():
        monkeypatch.setattr(kv_cache, name, lambda device, value=value: value)
    engine = start_engine(EngineConfig(checkpoint=str(servable_checkpoint), gpu_memory_utilization=0.5,
                                       max_num_batched_tokens=16))
    try:
        block_bytes = bytes_per_block(GemmaConfig.from_checkpoint(servable_checkpoint), 16, torch.float32)
        blocks = 4 * MIB // block_bytes
        usage = engine.stats().kv_cache
        assert (usage.total_blocks, usage.num_bytes) == (blocks, blocks * block_bytes)
        assert engine.limits.num_blocks == blocks
    finally:
        engine.shutdown()


def test_an_engine_whose_utilization_leaves_no_kv_cache_fails_to_start_naming_the_host_memory(servable_checkpoint):
    """The real readings on this host: a share below what the loaded engine already holds."""
    cfg = GemmaConfig.from_checkpoint(servable_checkpoint)
    sequence_blocks = blocks_for(cfg.max_position_embeddings, 16)
    with pytest.raises(ValueError, match=rf"^gpu_memory_utilization=1e-06 of {memory.host_total_bytes()} bytes on "
                                         rf"cpu is \d+ bytes, and this process already uses \d+: that leaves -\d+ "
                                         rf"bytes for the KV cache, less than the {sequence_blocks} blocks"):
        start_engine(EngineConfig(checkpoint=str(servable_checkpoint), gpu_memory_utilization=1e-6))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "gemma3_text", seed=0)


def test_a_kv_cache_beyond_the_containers_limit_fails_though_the_host_has_room(tmp_path, monkeypatch,
                                                                               tiny_checkpoint):
    """A container whose limit leaves 16 MiB on a host with 32 GiB available: the cache is sized
    against the 16 MiB, and one larger fails naming the setting and those bytes."""
    proc, cgroup = fake_machine(tmp_path, 32 * GIB, "0::/\n",
                                {"memory.max": str(2 * GIB), "memory.current": str(2 * GIB - 16 * MIB)})
    monkeypatch.setattr(memory, "PROC", proc)
    monkeypatch.setattr(memory, "CGROUP_ROOT", cgroup)
    cfg = GemmaConfig.from_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match=rf"kv_cache_bytes={32 * MIB} does not fit: {16 * MIB} bytes are free on cpu"):
        PagedKVCache.from_budget(cfg, 32 * MIB, 16, torch.float32, "cpu")
    assert PagedKVCache.from_budget(cfg, 8 * MIB, 16, torch.float32, "cpu").pool.num_blocks > 0


def test_weights_that_do_not_fit_the_gpus_free_memory_fail_naming_both(tiny_checkpoint):
    model, _ = load_reference_model(tiny_checkpoint, torch.bfloat16, "cpu")
    weights = sum(p.numel() for p in model.parameters()) * 2  # what loading them as bfloat16 takes
    device = torch.device("cuda", 1)  # only named in the message: nothing is allocated
    check_weights_fit(tiny_checkpoint, torch.bfloat16, device, free=weights)
    with pytest.raises(CheckpointError) as refused:
        check_weights_fit(tiny_checkpoint, torch.bfloat16, device, free=weights - 1)
    assert str(refused.value) == (
        f"the weights of {tiny_checkpoint} take {weights} bytes ({weights / GIB:.2f} GiB) as bfloat16 but only "
        f"{weights - 1} bytes ({(weights - 1) / GIB:.2f} GiB) are free on cuda:1; free the GPU (nvidia-smi lists "
        f"what holds it) or serve a smaller checkpoint")
    # float32 takes twice the bytes of the same checkpoint
    with pytest.raises(CheckpointError, match=f"take {2 * weights} bytes"):
        check_weights_fit(tiny_checkpoint, torch.float32, device, free=2 * weights - 1)
