"""Run tritonserver on a model repository, in the foreground (this process becomes the server).

    python scripts/tritonserver.py --model-repository model_repository [--http-port 8000 ...]
    python scripts/tritonserver.py --print-env     # the environment and command it would run

Which server: `tritonserver` from PATH when there is one (an NGC container: its own backends), else
the Triton 2.51 that the `nvidia-pytriton` wheel bundles. The bundled one needs three things the
wheel leaves undone, all done here for the Python interpreter running this script (the venv's):
- a backend directory with the Python backend stub built for this Python version (the wheel keeps
  one stub per version aside); it is assembled under `<venv>/triton-backends/` - links to the
  wheel's files plus a copy of the stub;
- LD_LIBRARY_PATH: this interpreter's libpython first (the stub must embed the same Python as the
  venv, not a system libpython of the same version), then the wheel's `nvidia_pytriton.libs`;
- PATH with the venv's `bin` first: the stub takes its sys.prefix, hence site-packages, from the
  `python3` it finds there.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bundled_triton() -> Path:
    # Located, not imported: importing pytriton needs packages (gevent) the server itself does not.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        sys.exit("no tritonserver on PATH and nvidia-pytriton is not installed: run `make setup`")
    return Path(spec.origin).parent / "tritonserver"


def _python_backend_dir(triton: Path) -> Path:
    """<venv>/triton-backends with backends/python holding the stub that matches this Python."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        sys.exit(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    backends = Path(sys.prefix) / "triton-backends"
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in (triton / "backends" / "python").iterdir():
        if src.is_file():
            link = python / src.name
            if not (link.is_symlink() and link.resolve() == src.resolve()):
                link.unlink(missing_ok=True)
                link.symlink_to(src)
    target = python / stub.name
    if not target.exists() or target.stat().st_size != stub.stat().st_size or target.stat().st_mtime < stub.stat().st_mtime:
        tmp = target.with_suffix(".tmp")
        shutil.copy2(stub, tmp)
        tmp.replace(target)  # atomic: two servers starting at once both see a whole file
    return backends


def _prepend(env: dict[str, str], name: str, *paths: object) -> None:
    parts = [str(p) for p in paths] + [p for p in env.get(name, "").split(os.pathsep) if p]
    env[name] = os.pathsep.join(dict.fromkeys(parts))


def server_command(model_repository: Path, http_port: int = 8000, grpc_port: int = 8001,
                   metrics_port: int = 8002, extra_args: list[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The tritonserver argv and environment for `model_repository` (explicit model loading stays off)."""
    env = dict(os.environ)
    _prepend(env, "PATH", Path(sys.executable).parent)
    args = [f"--model-repository={model_repository}",
            f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
            "--allow-metrics=true"]
    if not any(a.startswith("--model-control-mode") for a in extra_args):
        args.append("--model-control-mode=none")  # Triton's default too; said explicitly
    system = shutil.which("tritonserver")
    if system:
        binary = system
    else:
        triton = _bundled_triton()
        binary = str(triton / "bin" / "tritonserver")
        _prepend(env, "LD_LIBRARY_PATH", sysconfig.get_config_var("LIBDIR"),
                 triton.parent.parent / "nvidia_pytriton.libs")
        args.append(f"--backend-directory={_python_backend_dir(triton)}")
    return [binary, *args, *extra_args], env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8000)))
    p.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", 8001)))
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("METRICS_PORT", 8002)))
    p.add_argument("--print-env", action="store_true", help="print the command and environment, start nothing")
    args, extra = p.parse_known_args()
    argv, env = server_command(args.model_repository.resolve(), args.http_port, args.grpc_port,
                               args.metrics_port, extra)
    if args.print_env:
        for name in ("PATH", "LD_LIBRARY_PATH"):
            print(f"{name}={env.get(name, '')}")
        print(" ".join(argv))
        return
    sys.stdout.flush()
    os.execve(argv[0], argv, env)  # signals (Ctrl-C, SIGTERM) now go straight to tritonserver


if __name__ == "__main__":
    main()
