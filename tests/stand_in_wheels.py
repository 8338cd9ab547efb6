"""Installable stand-ins for the wheels the GPU carry scripts pack (scripts/prepare-gpu-*-carry.sh)."""
import zipfile
from pathlib import Path


def write_wheel(path: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """A minimal installable wheel holding `files`."""
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {**files, f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
        z.writestr(f"{dist}/RECORD", record)
