"""AIPerf on the GPU machine (issue #28), its CPU-checkable parts: the carry folders that
scripts/prepare-gpu-aiperf-carry.sh writes, the install and hand-over their run.sh does, and
benchmarks/aiperf_run.py's choice of how to start AIPerf. AIPerf itself runs there (or `make aiperf`)."""
import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import aiperf_run
from tests.stand_in_wheels import write_wheel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare-gpu-aiperf-carry.sh"
FOLDER_BYTES = 300_000
# Stand-ins as big as they are relative to a folder: aiperf's and pydantic-core's wheels fill most of one.
SIZES = {"aiperf": 200_000, "pydantic-core": 150_000, "crick": 120_000}


def list_deps() -> list[str]:
    listed = subprocess.run(["bash", str(SCRIPT), "--list-deps"], capture_output=True, text=True, check=True)
    return listed.stdout.split()


@pytest.fixture(scope="module")
def carry(tmp_path_factory):
    """The script run on a cache of stand-in wheels (incompressible bytes) with folders of at most
    300 kB, in a scratch directory laid out like the repository root."""
    tmp = tmp_path_factory.mktemp("carry")
    cache, repo = tmp / "cache", tmp / "repo"
    for d in (cache, repo / "benchmarks"):
        d.mkdir(parents=True)
    (repo / "pyproject.toml").write_text("")
    (repo / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "triton_stub_env.sh", repo / "scripts")  # run.sh sources it from the repository
    rng = __import__("random").Random(0)
    deps = list_deps()
    for spec in deps:
        name, version = spec.split("==")
        module = name.replace("-", "_")
        write_wheel(cache / f"{module}-{version}-py3-none-any.whl", name, version,
                    {f"{module}/__init__.py": b"", f"{module}/data.bin": rng.randbytes(SIZES.get(name, 2_000))})
    env = {**os.environ, "AIPERF_CARRY_CACHE": str(cache), "AIPERF_CARRY_FOLDER_BYTES": str(FOLDER_BYTES)}
    run = subprocess.run(["bash", str(SCRIPT)], cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    folders = sorted(repo.glob(".gpu-aiperf*"), key=lambda p: int(p.name.removeprefix(".gpu-aiperf")))
    return SimpleNamespace(repo=repo, cache=cache, deps=deps, folders=folders, stdout=run.stdout,
                           run_sh=(folders[-1] / "run.sh").read_text())


def test_the_carry_is_pinned_and_holds_aiperf_without_its_plotting_and_operator_extras():
    deps = list_deps()
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][\w.]*", spec) for spec in deps), deps
    names = [spec.split("==")[0] for spec in deps]
    assert len(names) == len(set(names)) and "aiperf==0.13.0" in deps
    assert not {"plotly", "dash", "kaleido", "kopf", "kubernetes-asyncio", "optuna"} & set(names)


def test_folders_stay_under_the_limit_biggest_wheels_first_and_carry_every_wheel_once(carry):
    # 200, 150 and 120 kB and 16 small ones in 300 kB folders: aiperf's first, then the next two
    # (together too big for the first), the small ones into the first folder with room.
    assert len(carry.folders) == 2
    assert {p.name.split("-")[0] for p in carry.folders[1].iterdir()} == {"pydantic_core", "crick", "run.sh"}
    for folder in carry.folders:
        assert sum(f.stat().st_size for f in folder.iterdir()) <= FOLDER_BYTES
    assert next(carry.folders[0].glob("aiperf-0.13.0-*.whl"))
    carried = [p.name for folder in carry.folders for p in folder.iterdir() if p.name != "run.sh"]
    assert sorted(carried) == sorted(p.name for p in carry.cache.iterdir())
    wheels = re.search(r"^wheels=\((.*)\)$", carry.run_sh, re.M).group(1).split()
    assert sorted(wheels) == sorted(carried)
    assert [f for folder in carry.folders for f in folder.glob("run.sh")] == [carry.folders[-1] / "run.sh"]


def test_the_calls_are_printed_in_order_the_last_one_running_run_sh(carry):
    calls = [line.split("]", 1) for line in carry.stdout.splitlines() if line.startswith("  [")]
    assert [c[0].strip(" [") for c in calls] == [f.name for f in carry.folders]
    assert all(f"cp {f.name}/* ~/aiperf-carry/" in c[1] for f, c in zip(carry.folders, calls))
    assert ["bash ~/aiperf-carry/run.sh" in c[1] for c in calls] == [False] * (len(calls) - 1) + [True]


def test_run_sh_waits_for_every_folder_installs_once_and_hands_over_to_aiperf_run(carry, tmp_path):
    # benchmarks.aiperf_run stands in for the real one: it prints what it was given.
    (carry.repo / "benchmarks" / "aiperf_run.py").write_text(
        "import os, sys\nprint('ARGS', *sys.argv[1:])\nprint('ENV', os.environ['PYTHONPATH'], "
        "os.environ['AIPERF_PYTHON'])\n")
    home, site, out = tmp_path / "home", tmp_path / "site", tmp_path / "out"
    carried = home / "aiperf-carry"
    carried.mkdir(parents=True)
    env = {**os.environ, "HOME": str(home), "OUT": str(out), "PYTHON": sys.executable, "AIPERF_SITE": str(site),
           "WORK": str(tmp_path / "work")}
    env.pop("PYTHONPATH", None)

    def run_sh():
        return subprocess.run(["bash", str(carried / "run.sh"), "--url", "http://127.0.0.1:9", "--model", "g"],
                              cwd=carry.repo, env=env, capture_output=True, text=True, timeout=120)

    for folder in carry.folders[1:]:
        for f in folder.iterdir():
            (carried / f.name).write_bytes(f.read_bytes())
    early = run_sh()
    assert early.returncode == 2 and "aiperf-0.13.0-py3-none-any.whl" in early.stderr and not site.exists()
    for f in carry.folders[0].iterdir():
        (carried / f.name).write_bytes(f.read_bytes())
    installed = run_sh()
    # Installed; then the import check stops it: the stand-in has no aiperf.cli.
    assert installed.returncode == 3, installed.stderr
    dists = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert dists == {spec.split("==")[0].replace("-", "_") for spec in carry.deps}
    assert len(list(site.glob(".installed-*"))) == 1

    # With an aiperf.cli and the vLLM carry's tokenizer archive: no second install, the tokenizer
    # unpacked, benchmarks.aiperf_run run with the site first and the options passed on.
    (site / "aiperf" / "cli.py").write_text("app = None\n")
    (home / "vllm-carry").mkdir()
    (home / "vllm-carry" / "tokenizer.json.gz").write_bytes(gzip.compress(b'{"model": {}}'))
    (home / "vllm-carry" / "tokenizer_config.json").write_text("{}")
    done = run_sh()
    assert done.returncode == 0, done.stderr
    assert (site / "aiperf" / "cli.py").exists()  # not reinstalled over
    tok = tmp_path / "work" / "tokenizer"
    assert (tok / "tokenizer.json").read_text() == '{"model": {}}' and (tok / "tokenizer_config.json").exists()
    args = next(line for line in done.stdout.splitlines() if line.startswith("ARGS")).split()[1:]
    assert args[:2] == ["--tokenizer", str(tok)] and args[-4:] == ["--url", "http://127.0.0.1:9", "--model", "g"]
    assert f"ENV {site} {sys.executable}" in done.stdout
    assert (out / "aiperf.md").read_text() == done.stdout and (out / "aiperf.log").exists()

    # Without --url, our server: it needs .gpu-serving (numpy 1.26 for Triton's stub, by
    # scripts/triton_stub_env.sh's .pth) and the vLLM carry's site (the gateway's fastapi); AIPerf runs
    # through a python that sets GEMMA_MACHINE_NUMPY, which the .pth steps aside for.
    ours = ["--checkpoint", "/ckpt", "--engine", "te"]
    refused = subprocess.run(["bash", str(carried / "run.sh"), *ours], cwd=carry.repo, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and ".gpu-serving" in refused.stderr
    (carry.repo / ".gpu-serving").mkdir()
    (carry.repo / ".gpu-serving" / "tokenizer.json.gz").write_bytes(gzip.compress(b"{}"))
    (home / "vllm-site").mkdir()
    stub_site = tmp_path / "stub-site"  # where the .pth goes: not this interpreter's site-packages
    stub_site.mkdir()
    python = tmp_path / "python3"
    python.write_text(f'#!/bin/sh\ncase "$2" in *sysconfig*) echo {stub_site}; exit;; esac\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    (carry.repo / "benchmarks" / "aiperf_run.py").write_text(
        "import os, subprocess, sys\nprint('ARGS', *sys.argv[1:])\nprint('ENV', os.environ['PYTHONPATH'])\n"
        "print('PTH', *os.listdir(sys.argv[-1]))\n"
        "print('AIPERF', subprocess.run([os.environ['AIPERF_PYTHON'], '-c', "
        "'import os; print(os.environ.get(\"GEMMA_MACHINE_NUMPY\"))'], capture_output=True, text=True).stdout)\n")
    served = subprocess.run(["bash", str(carried / "run.sh"), *ours, str(stub_site)], cwd=carry.repo,
                            env={**env, "PYTHON": str(python)}, capture_output=True, text=True, timeout=120)
    assert served.returncode == 0, served.stderr
    lines = dict(line.split(" ", 1) for line in served.stdout.splitlines() if " " in line)
    assert lines["ARGS"].split()[-5:-1] == ours and "--url" not in lines["ARGS"]
    assert lines["ENV"] == f"{site}:{home / 'vllm-site'}"
    assert lines["PTH"] == "00-gemma-serving.pth" and lines["AIPERF"] == "1"
    assert list(stub_site.iterdir()) == []  # the .pth goes when the run ends


def test_aiperf_runs_from_its_venv_by_default_and_from_a_python_when_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("AIPERF_PYTHON", raising=False)
    args = aiperf_run.parse_args(["--tokenizer", str(tmp_path)])
    command = aiperf_run.aiperf_command(args, "chat", 4, "http://h:1", tmp_path / "out")
    assert command[:2] == [str(aiperf_run.AIPERF), "profile"]
    monkeypatch.setenv("AIPERF_PYTHON", "/usr/bin/python3")
    command = aiperf_run.aiperf_command(aiperf_run.parse_args([]), "chat", 4, "http://h:1", tmp_path)
    assert command[:4] == ["/usr/bin/python3", "-m", "aiperf", "profile"]
    args = aiperf_run.parse_args(["--aiperf-python", "py"])
    assert aiperf_run.aiperf_command(args, "completions", 1, "http://h:1", tmp_path)[:3] == ["py", "-m", "aiperf"]
