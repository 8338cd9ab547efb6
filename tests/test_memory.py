"""backend/memory.py: what the host and its memory cgroup leave, as the KV cache check sees it; and the
weights' check against a GPU's free memory (backend/weights.py), which needs no GPU to be tested."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend import memory
from backend.config import GemmaConfig
from backend.kv_cache import PagedKVCache
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
