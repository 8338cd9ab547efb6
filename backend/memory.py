"""How much memory an allocation can take now, asked before the engine allocates its weights and its
KV cache: on a GPU its free memory, on the host what Linux says is available, or less where this
process's memory cgroup (a container's limit) leaves less.

A container's /proc/meminfo shows the whole host's memory: a server with a 16 GiB limit on a 512 GiB
host would size its cache by the host and be OOM-killed when it fills. The cgroup's own files say
what the limit leaves: memory.max - memory.current (cgroup v2), memory.limit_in_bytes -
memory.usage_in_bytes (v1). Every ancestor's limit applies too, so each level up to the mount's root
is read and the smallest headroom counts.
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


def host_available_bytes(proc: Optional[Path] = None, cgroup_root: Optional[Path] = None) -> Optional[int]:
    """min(MemAvailable, the memory cgroup's headroom); None where neither can be read. The paths are
    /proc and /sys/fs/cgroup unless given (tests)."""
    proc, cgroup_root = proc or PROC, cgroup_root or CGROUP_ROOT
    readings = [b for b in (mem_available(proc / "meminfo"), cgroup_headroom(proc / "self" / "cgroup", cgroup_root))
                if b is not None]
    return min(readings) if readings else None


def mem_available(meminfo: Path) -> Optional[int]:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cgroup_headroom(self_cgroup: Path, cgroup_root: Path) -> Optional[int]:
    """The least (limit - usage) over this process's memory cgroup and its ancestors; None without a
    limit. `self_cgroup` is /proc/self/cgroup: "0::/path" for cgroup v2, "N:memory:/path" (among the
    other controllers' lines) for v1, whose memory hierarchy is mounted at <root>/memory."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            return _headroom(cgroup_root, path, CGROUP_V2_FILES)
        if "memory" in controllers.split(","):
            return _headroom(cgroup_root / "memory", path, CGROUP_V1_FILES)
    return None


def _headroom(mount: Path, path: str, files: tuple[str, str]) -> Optional[int]:
    own = mount / path.lstrip("/")
    # In a container the mount often is the container's own cgroup while /proc/self/cgroup still
    # names the host's path (cgroup v1, or v2 without a cgroup namespace): then the mount is ours.
    level = own if own.is_dir() else mount
    headrooms = []
    while True:
        limit, usage = (_read_number(level / name) for name in files)
        if limit is not None and usage is not None:
            headrooms.append(max(limit - usage, 0))
        if level == mount or mount not in level.parents:
            break
        level = level.parent
    return min(headrooms) if headrooms else None


def _read_number(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit
