"""scripts/triton_stub_env.sh, the .pth that gives Triton's Python stub numpy<2, the repository and
client/ on the GPU machine: written for the run, numpy 1.26 installed only where the Python has numpy 2,
removed when the script ends. The Python is a stand-in that answers the function's three questions."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = r"""#!/usr/bin/env bash
# sysconfig -> the scratch site; the numpy<2 check -> fails while $STATE/numpy2 exists; pip -> logged
if [[ $1 == -c && $2 == *sysconfig* ]]; then echo "$SITE"
elif [[ $1 == -c && $2 == *numpy* ]]; then [[ ! -f $STATE/numpy2 ]]
elif [[ $1 == -m && $2 == pip ]]; then echo "$*" >> "$STATE/pip.log"; rm -f "$STATE/numpy2"
fi
"""


def run(tmp_path: Path, numpy2: bool) -> tuple[subprocess.CompletedProcess, Path, Path]:
    site, state, py = tmp_path / "site", tmp_path / "state", tmp_path / "python"
    site.mkdir()
    state.mkdir()
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    if numpy2:
        (state / "numpy2").touch()
    script = (f'source scripts/triton_stub_env.sh && triton_stub_env "{py}" /wheels "{tmp_path}/work" writer || exit 1\n'
              'cat "$TRITON_STUB_PTH"')
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "SITE": str(site), "STATE": str(state)}, timeout=30)
    return done, site, state


def test_the_pth_puts_the_repository_first_for_the_run_and_goes_with_it(tmp_path):
    done, site, state = run(tmp_path, numpy2=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == [str(ROOT), f"{ROOT}/client"]
    assert not (state / "pip.log").exists()  # numpy<2 already: nothing installed
    assert list(site.iterdir()) == []  # removed when the script ended


def test_numpy_1_goes_ahead_of_everything_where_the_python_has_numpy_2(tmp_path):
    done, site, state = run(tmp_path, numpy2=True)
    assert done.returncode == 0, done.stderr
    pip = (state / "pip.log").read_text()
    assert f"--target {tmp_path}/work/numpy /wheels/numpy-1.26.4-*.whl" in pip
    lines = done.stdout.splitlines()[1:]
    assert lines[2:] == [str(ROOT), f"{ROOT}/client"]
    assert list(site.iterdir()) == []
    # The .pth as Python reads it: numpy 1.26 first and scipy hidden, except in a process started with
    # GEMMA_MACHINE_NUMPY set (AIPerf beside our server), which keeps the machine's numpy 2.
    kept = tmp_path / "kept-site"
    kept.mkdir()
    (kept / "00-gemma-serving.pth").write_text("\n".join(lines[:2]) + "\n")
    probe = (f"import site, sys; site.addsitedir({str(kept)!r}); "
             "print(sys.path[0] or '-', sys.modules.get('scipy', 'unset'))")

    def shown(**env) -> list[str]:
        done = subprocess.run([sys.executable, "-c", probe], env={"PATH": "/usr/bin:/bin", **env},
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert shown() == [f"{tmp_path}/work/numpy", "None"]
    first, scipy = shown(GEMMA_MACHINE_NUMPY="1")
    assert (first, scipy) == ("-", "unset")


def test_a_stale_pth_is_dropped_for_the_runs_that_need_numpy_2(tmp_path):
    site, state, py = tmp_path / "site", tmp_path / "state", tmp_path / "python"
    site.mkdir()
    state.mkdir()
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    (site / "00-gemma-serving.pth").write_text("/numpy1\n")
    (site / "other.pth").write_text("/kept\n")
    done = subprocess.run(["bash", "-c", f'source scripts/triton_stub_env.sh && drop_stale_stub_pth "{py}"'], cwd=ROOT,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "SITE": str(site)}, timeout=30)
    assert done.returncode == 0 and "removing" in done.stderr
    assert [p.name for p in site.iterdir()] == ["other.pth"]
