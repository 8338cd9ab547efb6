"""Packs a carry's pieces into folders of one `run` call each for the GPU machine, which takes at most
64 MiB per call, the repository included (scripts/prepare-gpu-vllm-carry.sh, prepare-gpu-aiperf-carry.sh).

    python3 scripts/carry_folders.py PIECES PREFIX LIMIT CARRY_DIR [RUN_ARGS]

Moves every file of PIECES into ./PREFIX0, ./PREFIX1, ... (replacing earlier ones): biggest first, each
into the first folder with room for it under LIMIT bytes, and run.sh last, into the last folder if it
fits (its call runs it). Prints each folder's size and the calls: copy each folder into CARRY_DIR, the
last one then runs `bash CARRY_DIR/run.sh RUN_ARGS`.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def pack(pieces: list[Path], limit: int) -> list[list[Path]]:
    """First fit, biggest first; run.sh in the last folder (a new one if it has no room)."""
    folders: list[list[Path]] = []

    def size(folder: list[Path]) -> int:
        return sum(p.stat().st_size for p in folder)

    for piece in sorted((p for p in pieces if p.name != "run.sh"), key=lambda p: -p.stat().st_size):
        if piece.stat().st_size > limit:
            raise SystemExit(f"{piece.name} is bigger than a folder ({limit} bytes): split it first")
        room = next((f for f in folders if size(f) + piece.stat().st_size <= limit), None)
        if room is None:
            folders.append(room := [])
        room.append(piece)
    run_sh = next(p for p in pieces if p.name == "run.sh")
    if not folders or size(folders[-1]) + run_sh.stat().st_size > limit:
        folders.append([])
    folders[-1].append(run_sh)
    return folders


def main(pieces_dir: str, prefix: str, limit: str, carry_dir: str, run_args: str = "") -> None:
    folders = pack(list(Path(pieces_dir).iterdir()), int(limit))
    for old in Path(".").glob(f"{prefix}[0-9]*"):
        shutil.rmtree(old)
    names = [f"{prefix}{i}" for i in range(len(folders))]
    for name, files in zip(names, folders):
        Path(name).mkdir()
        for f in files:
            shutil.move(f, Path(name) / f.name)
        print(f"{name}  {sum(f.stat().st_size for f in Path(name).iterdir()):9d} bytes  {len(files):2d} files")
    print("\nOn the GPU machine, one call per line, back to back on one machine (an idle machine is given back"
          "\nafter ~30 s and a fresh one has none of the earlier folders), each carrying the named folder:")
    for name in names:
        call = f"mkdir -p {carry_dir} && cp {name}/* {carry_dir}/"
        if name == names[-1]:
            call += f" && bash {carry_dir}/run.sh" + (f" {run_args}" if run_args else "")
        print(f"  [{name}]  {call}")


if __name__ == "__main__":
    main(*sys.argv[1:])
