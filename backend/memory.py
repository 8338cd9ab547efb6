"""How much memory an allocation can take now, asked before the engine allocates its weights and its
KV cache: on a GPU its free memory, on the host what Linux says is available, or less where this
process's memory cgroup (a container's limit) leaves less.

A container's /proc/meminfo shows the whole host's memory: a server with a 16 GiB limit on a 512 GiB
host would size its cache by the host and be OOM-killed when it fills. The cgroup's own files say
what the limit leaves: memory.max - memory.current (cgroup v2), memory.limit_in_bytes -
memory.usage_in_bytes (v1). Every ancestor's limit applies too, so each level up to the mount's root
is read and the smallest headroom counts.

The same readings size the KV cache by vLLM's rule when EngineConfig.gpu_memory_utilization is set
(`utilization_budget`): that fraction of the memory the process may use at all (the GPU's total; on
the host MemTotal or the cgroup's limit, the least of its levels) less what this process already
holds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# The two files per controller: (limit, usage). A v2 limit reads "max" when there is none; a v1 one a
# huge number, which the min() below never picks.
CGROUP_V2_FILES = ("memory.max", "memory.current")
CGROUP_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes")


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Memory an allocation on `device` can take now: the GPU's free memory, or the host's
    (host_available_bytes); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available_bytes()


def total_memory_bytes(device: torch.device) -> Optional[int]:
    """All the memory this process may ever use on `device`: the GPU's total, or the host's
    (host_total_bytes); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return host_total_bytes()


def used_memory_bytes(device: torch.device) -> Optional[int]:
    """Memory this process holds on `device` now: on a GPU what torch's allocator has reserved, on
    the host this process's resident memory (VmRSS); None where it cannot be read."""
    if device.type == "cuda":
        # Blocks freed while loading would count as used though the KV cache could take them, and
        # mem_get_info's free memory (utilization_budget's check) leaves them out: hand them back.
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(device)
    return meminfo_bytes(PROC / "self" / "status", "VmRSS")


def utilization_budget(utilization: float, total_bytes: int, used_bytes: int, free_bytes: Optional[int],
                       block_bytes: int, sequence_blocks: int, device: str) -> int:
    """Bytes of KV cache under vLLM's gpu_memory_utilization: `utilization` of the device's total
    memory, less what this process already uses (the weights, and whatever else it allocated before
    the cache). Refused, naming the numbers, when that leaves less than one sequence of max_model_len
    (`sequence_blocks` blocks of `block_bytes`), or more than is free: other processes hold the rest, or
    memory outside torch's count (measured on an H100: this process's CUDA context, ~650 MB, so 1.0 never
    fits there; nor in vLLM, whose start refuses a share above the free memory)."""
    budget = int(utilization * total_bytes) - used_bytes
    rule = (f"gpu_memory_utilization={utilization} of {total_bytes} bytes on {device} is "
            f"{int(utilization * total_bytes)} bytes, and this process already uses {used_bytes}")
    if budget // block_bytes < sequence_blocks:
        raise ValueError(f"{rule}: that leaves {budget} bytes for the KV cache, less than the {sequence_blocks} "
                         f"blocks of {block_bytes} bytes one sequence of max_model_len needs; raise "
                         f"gpu_memory_utilization or lower max_model_len")
    if free_bytes is not None and budget > free_bytes:
        raise ValueError(f"{rule}: that leaves {budget} bytes for the KV cache, but only {free_bytes} bytes are "
                         f"free on {device} (other processes, or this one's CUDA context, hold the rest); lower "
                         f"gpu_memory_utilization")
    return budget


def host_available_bytes(proc: Optional[Path] = None, cgroup_root: Optional[Path] = None) -> Optional[int]:
    """min(MemAvailable, the memory cgroup's headroom); None where neither can be read. The paths are
    /proc and /sys/fs/cgroup unless given (tests)."""
    proc, cgroup_root = proc or PROC, cgroup_root or CGROUP_ROOT
    readings = [b for b in (meminfo_bytes(proc / "meminfo", "MemAvailable"),
                            cgroup_headroom(proc / "self" / "cgroup", cgroup_root)) if b is not None]
    return min(readings) if readings else None


def host_total_bytes(proc: Optional[Path] = None, cgroup_root: Optional[Path] = None) -> Optional[int]:
    """min(MemTotal, the memory cgroup's limit): the most this process may use; None where neither
    can be read. The paths as for host_available_bytes."""
    proc, cgroup_root = proc or PROC, cgroup_root or CGROUP_ROOT
    readings = [b for b in (meminfo_bytes(proc / "meminfo", "MemTotal"),
                            cgroup_limit(proc / "self" / "cgroup", cgroup_root)) if b is not None]
    return min(readings) if readings else None


def meminfo_bytes(path: Path, field: str) -> Optional[int]:
    """A "Field:  N kB" line of /proc/meminfo or /proc/self/status, in bytes."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cgroup_headroom(self_cgroup: Path, cgroup_root: Path) -> Optional[int]:
    """The least (limit - usage) over this process's memory cgroup and its ancestors; None without a
    limit."""
    return min((max(limit - usage, 0) for limit, usage in _cgroup_levels(self_cgroup, cgroup_root)
                if limit is not None and usage is not None), default=None)


def cgroup_limit(self_cgroup: Path, cgroup_root: Path) -> Optional[int]:
    """The least limit over this process's memory cgroup and its ancestors; None without one."""
    return min((limit for limit, _ in _cgroup_levels(self_cgroup, cgroup_root) if limit is not None), default=None)


def _cgroup_levels(self_cgroup: Path, cgroup_root: Path) -> list[tuple[Optional[int], Optional[int]]]:
    """(limit, usage) of this process's memory cgroup and each ancestor up to the mount's root. `self_cgroup`
    is /proc/self/cgroup: "0::/path" for cgroup v2, "N:memory:/path" (among the other controllers'
    lines) for v1, whose memory hierarchy is mounted at <root>/memory."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            return _levels(cgroup_root, path, CGROUP_V2_FILES)
        if "memory" in controllers.split(","):
            return _levels(cgroup_root / "memory", path, CGROUP_V1_FILES)
    return []


def _levels(mount: Path, path: str, files: tuple[str, str]) -> list[tuple[Optional[int], Optional[int]]]:
    own = mount / path.lstrip("/")
    # In a container the mount often is the container's own cgroup while /proc/self/cgroup still
    # names the host's path (cgroup v1, or v2 without a cgroup namespace): then the mount is ours.
    level = own if own.is_dir() else mount
    readings = []
    while True:
        readings.append(tuple(_read_number(level / name) for name in files))
        if level == mount or mount not in level.parents:
            break
        level = level.parent
    return readings


def _read_number(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit
