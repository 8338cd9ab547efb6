"""The vLLM side-by-side benchmark's CPU-checkable parts (issue #17): the carry folders that
scripts/prepare-gpu-vllm-carry.sh writes and the install their run.sh does, the parent's handling of
parts that cannot start, the decode arithmetic, and VllmTarget's token counting. vLLM itself runs only
on the GPU machine (tests/gpu/test_vllm_baseline.py)."""
import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import random_checkpoint, serving, speculative, vllm_baseline
from benchmarks.stats import Timeline
from tests.stand_in_wheels import write_wheel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare-gpu-vllm-carry.sh"
DROPPED = ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/_moe_C_stable_libtorch.abi3.so", "vllm/vllm-rs")
WHEEL = "vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl"
BIG_DEP, BIG_DEP_BYTES = "llvmlite", 350_000


@pytest.fixture(scope="module")
def carry(tmp_path_factory):
    """The script run on a cache of stand-in wheels (incompressible bytes, so the split is real) with
    folders of at most 300 kB, in a scratch directory laid out like the repository root."""
    tmp = tmp_path_factory.mktemp("carry")
    cache, repo, tokenizer = tmp / "cache", tmp / "repo", tmp / "tokenizer"
    for d in (cache, repo / "benchmarks", tokenizer):
        d.mkdir(parents=True)
    (repo / "pyproject.toml").write_text("")
    (repo / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "triton_stub_env.sh", repo / "scripts")  # run.sh sources it from the repository
    (tokenizer / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(2000)}}}))
    (tokenizer / "tokenizer_config.json").write_text("{}")
    rng = __import__("random").Random(0)
    payload = {f"vllm/blob{i}.so": rng.randbytes(200_000) for i in range(3)}
    payload.update({name: rng.randbytes(50_000) for name in DROPPED})
    payload["vllm/__init__.py"] = b"__version__ = '0.26.0'\n"
    write_wheel(cache / WHEEL, "vllm", "0.26.0", payload)
    deps = subprocess.run(["bash", str(SCRIPT), "--list-deps"], capture_output=True, text=True, check=True).stdout.split()
    for spec in deps:
        name, version = spec.split("==")
        module = name.replace("-", "_")
        size = BIG_DEP_BYTES if name == BIG_DEP else 2_000  # llvmlite is bigger than a folder there too
        write_wheel(cache / f"{module}-{version}-py3-none-any.whl", name, version,
                    {f"{module}/__init__.py": b"", f"{module}/data.bin": rng.randbytes(size)})
    env = {**os.environ, "VLLM_CARRY_CACHE": str(cache), "VLLM_CARRY_FOLDER_BYTES": "300000",
           "VLLM_CARRY_TOKENIZER": str(tokenizer)}
    run = subprocess.run(["bash", str(SCRIPT)], cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    folders = sorted(repo.glob(".gpu-vllm*"), key=lambda p: int(p.name.removeprefix(".gpu-vllm")))
    return SimpleNamespace(repo=repo, cache=cache, deps=deps, folders=folders, stdout=run.stdout,
                           run_sh=(folders[-1] / "run.sh").read_text())


def parts_of(carry, wheel: str) -> list[Path]:
    return sorted((p for folder in carry.folders for p in folder.glob(f"{wheel}.part*")), key=lambda p: p.name)


def test_folders_stay_under_the_limit_and_rejoin_into_the_wheels_without_the_dropped_files(carry, tmp_path):
    # 600 kB of vLLM and 350 kB of llvmlite in 300 kB folders: 3 full parts, the rest beside the extras.
    assert len(carry.folders) == 4
    for folder in carry.folders:
        assert sum(f.stat().st_size for f in folder.iterdir()) <= 300_000
    joined_line = re.search(r"^joined=\((.*?)\)", carry.run_sh, re.M).group(1).split()
    joined = {entry.split(":")[0]: entry.split(":")[1:] for entry in joined_line}
    llvmlite = next(n for n in joined if n.startswith("llvmlite-"))
    assert set(joined) == {WHEEL, llvmlite}
    for name, (sha, n) in joined.items():
        parts = parts_of(carry, name)
        assert len(parts) == int(n) == (3 if name == WHEEL else 2)
        data = b"".join(p.read_bytes() for p in parts)
        assert hashlib.sha256(data).hexdigest() == sha
        (tmp_path / name).write_bytes(data)
    assert (tmp_path / llvmlite).read_bytes() == (carry.cache / llvmlite).read_bytes()
    with zipfile.ZipFile(tmp_path / WHEEL) as z, zipfile.ZipFile(carry.cache / WHEEL) as original:
        assert set(z.namelist()) == set(original.namelist()) - set(DROPPED)
        record = z.read("vllm-0.26.0.dist-info/RECORD").decode()
        assert not any(name in record for name in DROPPED)
        assert z.read("vllm/blob1.so") == original.read("vllm/blob1.so")


def test_run_sh_installs_every_wheel_once_and_the_calls_are_printed_in_order(carry):
    deps = re.search(r"^deps=\((.*)\)$", carry.run_sh, re.M).group(1).split()
    assert len(deps) == len(set(deps)) == len(carry.deps)
    carried = {p.name for folder in carry.folders for p in folder.iterdir()}
    assert all(d in carried or f"{d}.part00" in carried for d in deps)
    assert (carry.folders[-1] / "run.sh").exists()
    assert re.search(r'pip install -q --no-index --no-deps --no-compile --target "\$site" \\\n\s+'
                     r'"\$carry/\$wheel" "\$\{deps\[@\]/#/\$carry/\}"', carry.run_sh)
    calls = [line.split("]", 1) for line in carry.stdout.splitlines() if line.startswith("  [")]
    assert [c[0].strip(" [") for c in calls] == [f.name for f in carry.folders]
    assert all(f"cp {f.name}/* ~/vllm-carry/" in c[1] for f, c in zip(carry.folders, calls))
    assert [c[1].endswith("bash ~/vllm-carry/run.sh") for c in calls] == [False] * (len(calls) - 1) + [True]


def test_run_sh_waits_for_every_part_then_rejoins_checks_and_installs(carry, tmp_path):
    (carry.repo / "benchmarks" / "vllm_baseline.py").write_text("")
    site, carried = tmp_path / "site", tmp_path / "carried"
    carried.mkdir()
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "VLLM_SITE": str(site),
           "VLLM_CARRY": str(carried), "WORK": str(tmp_path / "work")}

    def run_sh():
        return subprocess.run(["bash", str(carried / "run.sh")], cwd=carry.repo, env=env, capture_output=True,
                              text=True, timeout=300)

    for folder in carry.folders[:-1]:
        for f in folder.iterdir():
            (carried / f.name).write_bytes(f.read_bytes())
    (carried / "run.sh").write_text(carry.run_sh)
    early = run_sh()
    assert early.returncode == 2 and f"{WHEEL}.part02" in early.stderr and not site.exists()
    for f in carry.folders[-1].iterdir():
        (carried / f.name).write_bytes(f.read_bytes())
    done = run_sh()
    # Installed; then the import check stops it: the stand-in is no vLLM (the GPU machine runs the rest).
    assert done.returncode == 3, done.stderr
    assert (site / "vllm" / "blob2.so").exists() and not (site / "vllm" / "vllm-rs").exists()
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert installed == {"vllm"} | {spec.split("==")[0].replace("-", "_") for spec in carry.deps}
    assert len(list(site.glob(".installed-*"))) == 1


# What the serve test's vLLM holds beyond the stand-in wheel: the modules run.sh's import check loads, and an
# api_server that records how it was started and answers /health on its --port (the last one given wins).
FAKE_SERVER = {
    "vllm/_C_stable_libtorch.py": "",
    "vllm/vllm_flash_attn/__init__.py": "",
    "vllm/vllm_flash_attn/flash_attn_interface.py": "FA3_AVAILABLE, FA3_UNAVAILABLE_REASON = True, None\n",
    "vllm/entrypoints/__init__.py": "",
    "vllm/entrypoints/openai/__init__.py": "",
    "vllm/entrypoints/openai/api_server.py": """import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
if "--fail" in sys.argv:
    sys.exit("stand-in server: failing at start")
argv = sys.argv[1:]
with open(os.environ["FAKE_SERVER_RECORD"], "w") as f:
    json.dump({"argv": argv, "flashinfer_sampler": os.environ.get("VLLM_USE_FLASHINFER_SAMPLER")}, f)
port = int([a for i, a in enumerate(argv[1:]) if argv[i] == "--port"][-1])

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

HTTPServer(("127.0.0.1", port), Health).serve_forever()
""",
}


def test_run_sh_serve_starts_vllm_s_openai_server_waits_for_health_and_leaves_it_running(carry, tmp_path):
    site, carried, out, work = tmp_path / "site", tmp_path / "carried", tmp_path / "out", tmp_path / "work"
    carried.mkdir()
    for f in (f for folder in carry.folders for f in folder.iterdir()):
        (carried / f.name).write_bytes(f.read_bytes())
    (work / "gemma-2b-random").mkdir(parents=True)
    (work / "gemma-2b-random" / "config.json").write_text("{}")
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "VLLM_SITE": str(site), "VLLM_CARRY": str(carried),
           "WORK": str(work), "VLLM_PORT": str(port), "LIMIT": "20", "FAKE_SERVER_RECORD": str(tmp_path / "record.json")}

    def run_sh(*args):
        return subprocess.run(["bash", str(carried / "run.sh"), *args], cwd=carry.repo, env=env, capture_output=True,
                              text=True, timeout=120)

    assert run_sh("serve").returncode == 3  # installed; the stand-in wheel's vLLM has no kernels to import
    for name, text in FAKE_SERVER.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
    failed = run_sh("serve", "--fail")
    assert failed.returncode == 4 and "failing at start" in failed.stderr and "ended before" in failed.stderr
    started = run_sh("serve", "--max-num-seqs", "256")
    pid = int((out / "vllm_serve.pid").read_text())
    try:
        assert started.returncode == 0, started.stderr
        assert f"serves gemma at http://127.0.0.1:{port}" in started.stdout
        assert (work / "vllm_serve.pid").read_text() == (out / "vllm_serve.pid").read_text()
        assert (out / "vllm_serve.log").exists() and (work / "vllm_serve.log").exists()
        os.kill(pid, 0)  # still running after run.sh returned
        record = json.loads((tmp_path / "record.json").read_text())
        argv = record["argv"]
        assert argv[argv.index("--model") + 1] == str(work / "gemma-2b-random")
        assert argv[argv.index("--served-model-name") + 1] == "gemma" and argv[-2:] == ["--max-num-seqs", "256"]
        assert record["flashinfer_sampler"] == "0"
        again = run_sh("serve")  # a second server on the same port is refused
        assert again.returncode == 4 and "already answers" in again.stderr
    finally:
        os.kill(pid, 15)

def test_decode_numbers_are_gpu_bench_s():
    m = vllm_baseline.decode_metrics(batch=8, new=65, one_token_s=[0.05, 0.04, 0.06], all_tokens_s=[0.70, 0.69, 0.71])
    assert m["decode_s"] == pytest.approx(0.65)  # medians: 0.70 - 0.05
    assert m["decode_tok_s"] == pytest.approx(8 * 64 / 0.65)
    assert m["step_ms"] == pytest.approx(650 / 64)
    assert m["total_tok_s"] == pytest.approx(8 * 65 / 0.70)


def test_engine_arguments_with_and_without_the_fallback():
    args = vllm_baseline.parse_args(["--checkpoint", "/m"])
    kw = vllm_baseline.engine_kwargs(args)
    assert kw["attention_backend"] == "FLASH_ATTN" and "compilation_config" not in kw
    assert (kw["dtype"], kw["max_num_seqs"], kw["gpu_memory_utilization"], kw["max_model_len"]) == ("bfloat16", 64, 0.5, 1024)
    safe = vllm_baseline.engine_kwargs(vllm_baseline.parse_args(["--checkpoint", "/m", "--attention-backend", "auto",
                                                                 "--compilation", "none"]))
    assert "attention_backend" not in safe and safe["compilation_config"] == vllm_baseline.NO_COMPILE


class FakeOutput:  # the fields of vLLM's RequestOutput that VllmTarget reads
    def __init__(self, token_ids, finish_reason=None):
        self.outputs = [SimpleNamespace(token_ids=token_ids, finish_reason=finish_reason)]
        self.finished = finish_reason is not None


class FakeEngine:
    def __init__(self, deltas, finish_reason="length"):
        self.deltas, self.finish_reason, self.requests = deltas, finish_reason, []

    async def generate(self, prompt, params, request_id):
        self.requests.append((prompt, params, request_id))
        for i, delta in enumerate(self.deltas):
            await asyncio.sleep(0)
            yield FakeOutput(delta, self.finish_reason if i == len(self.deltas) - 1 else None)


def test_vllm_target_counts_each_delta_s_tokens_and_needs_a_normal_finish():
    engine = FakeEngine([[5, 6], [], [7], [8, 9, 10]])
    target = vllm_baseline.VllmTarget(engine, lambda n: {"max_tokens": n})
    timeline = Timeline(0.0)
    asyncio.run(target.stream("hi", 6, timeline))
    assert [n for _, n in timeline.arrivals] == [2, 1, 3] and timeline.num_tokens == 6
    assert engine.requests == [("hi", {"max_tokens": 6}, "bench-0")]
    with pytest.raises(RuntimeError, match="abort"):
        asyncio.run(vllm_baseline.VllmTarget(FakeEngine([[1]], "abort"), lambda n: {}).stream("hi", 1, Timeline(0.0)))
    # Under the load generator: a request that ends short is an error, as for our targets.
    record = serving.measure(vllm_baseline.VllmTarget(FakeEngine([[1, 2], [3]]), lambda n: {}), "closed", ["a", "b"],
                             3, 30, concurrency=2, num_requests=4)
    assert (record["requests"], record["errors"], record["output_tokens"]) == (4, 0, 12)
    short = serving.measure(vllm_baseline.VllmTarget(FakeEngine([[1]]), lambda n: {}), "closed", ["a"], 3, 30,
                            concurrency=1, num_requests=2)
    assert short["error_kinds"] == {"wrong_token_count": 2}


@pytest.fixture
def gemma_checkpoint(tmp_path, default_checkpoint):
    """random_checkpoint's output at a CPU test's size, with the packaged tokenizer."""
    config = random_checkpoint.gemma_2b_config(2, random_checkpoint.tokenizer_vocab_size(default_checkpoint),
                                               hidden_size=64, intermediate_size=128, head_dim=16)
    random_checkpoint.make_checkpoint(tmp_path / "ckpt", config, "cpu", default_checkpoint)
    return tmp_path / "ckpt"


def test_the_random_checkpoint_is_one_vllm_loads_as_gemma(gemma_checkpoint, tmp_path):
    assert vllm_baseline.checkpoint_problems(gemma_checkpoint) == []
    assert vllm_baseline.checkpoint_problems(tmp_path / "nothing") == [f"no {tmp_path / 'nothing' / 'config.json'}"]
    (gemma_checkpoint / "tokenizer.json").unlink()
    assert vllm_baseline.checkpoint_problems(gemma_checkpoint) == ["no tokenizer.json"]


def test_parts_that_cannot_start_are_reported_retried_once_with_the_fallback_and_tabled(gemma_checkpoint, tmp_path,
                                                                                         monkeypatch):
    """Here vLLM is not installed: both parts fail at import, in their own processes; the parent goes on."""
    for key in vllm_baseline.VLLM_ENV:
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "vllm.jsonl"
    ours = tmp_path / "ours.jsonl"
    ours.write_text(json.dumps({"kind": "te_bf16", "batch": 1, "decode_tok_s": 377.0}) + "\n")
    assert vllm_baseline.main(["--checkpoint", str(gemma_checkpoint), "--out", str(out), "--ours", str(ours),
                               str(tmp_path / "absent.jsonl")]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds == ["vllm_env", "error", "retry", "error", "error"]
    errors = [r for r in records if r["kind"] == "error"]
    assert [(r["part"], r["attention_backend"], r["compilation"]) for r in errors] == [
        ("offline", "FLASH_ATTN", "default"), ("offline", "auto", "none"), ("serving", "auto", "none")]
    assert all("No module named 'vllm'" in r["error"] for r in errors)
    assert records[0]["vllm_files_absent"] is None and records[0]["env"]["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    table = out.with_suffix(".md").read_text()
    assert "- retry: part offline, attention_backend auto, compilation none" in table


def test_the_table_sets_ours_beside_vllm():
    """Formatting only: the numbers are made up."""
    server = {"type": "server", "mode": "closed", "concurrency": 64, "requests": 256, "errors": 0,
              "ttft_ms": {"p50": 30.0, "p99": 50.0}, "itl_ms": {"p50": 4.0, "p99": 6.0}}
    records = [{"kind": "vllm_offline", "batch": 64, "decode_tok_s": 10_000.0, "step_ms": 6.3, "total_tok_s": 9_000.0},
               {**server, "system": vllm_baseline.VllmTarget.name, "tokens_per_s": 8_000.0}]
    ours = [{"kind": "te_bf16", "batch": 64, "decode_tok_s": 20_000.0},
            {**server, "system": "engine_direct", "tokens_per_s": 4_000.0},
            {**server, "system": "server", "tokens_per_s": 2_000.0}]
    table = vllm_baseline.markdown(records, ours)
    assert "| 64 | 10,000 | 6.30 | 9,000 | 20,000 | 2.00 |" in table
    assert "- 64 clients, tok/s over vLLM's: engine_direct 0.50, server (Triton) 0.25" in table


def test_the_speculative_part_runs_one_child_per_vllm_method_after_off(tmp_path, monkeypatch):
    """Without vLLM each child fails at import; the parent runs off, then each method, each once more with
    the fallback only for the first failure, and needs no random checkpoint for this part."""
    for key in vllm_baseline.VLLM_ENV:
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "vllm.jsonl"
    assert vllm_baseline.main(["--parts", "speculative", "--checkpoint", str(tmp_path / "absent"),
                               "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["vllm_env", "error", "retry", "error", "error", "error"]
    errors = [r for r in records if r["kind"] == "error"]
    assert [(r["part"], r["spec_method"], r["compilation"]) for r in errors] == [
        ("speculative", "off", "default"), ("speculative", "off", "none"), ("speculative", "ngram", "none"),
        ("speculative", "ngram_gpu", "none")]
    assert all("No module named 'vllm'" in r["error"] for r in errors)


def test_speculative_engine_arguments_follow_our_benchmark():
    args = vllm_baseline.parse_args(["--spec-checkpoint", "/real"])
    off = vllm_baseline.speculative_engine_kwargs(args, "off")
    assert (off["model"], off["tokenizer"], off["max_model_len"], off["enable_prefix_caching"]) == ("/real", "/real", 2048, False)
    assert "speculative_config" not in off and off["disable_log_stats"] is False
    ngram = vllm_baseline.speculative_engine_kwargs(args, "ngram_gpu")["speculative_config"]
    assert ngram == {**speculative.SPECULATIVE_CONFIG, "method": "ngram_gpu"}


def test_vllm_speculative_requests_are_timed_per_delta_and_counted_from_vllm_s_counters():
    engine = FakeEngine([[5, 6, 7], [8], [9, 10]])
    timeline = Timeline(0.0)
    assert asyncio.run(vllm_baseline.generate_ids(engine, [1, 2], {"n": 1}, "spec-0", timeline)) == [5, 6, 7, 8, 9, 10]
    assert [n for _, n in timeline.arrivals] == [3, 1, 2]
    assert engine.requests == [({"prompt_token_ids": [1, 2]}, {"n": 1}, "spec-0")]
    with pytest.raises(RuntimeError, match="'stop'"):  # EOS is ignored: a request stopping early is wrong
        asyncio.run(vllm_baseline.generate_ids(FakeEngine([[1]], "stop"), [1], {}, "spec-1", Timeline(0.0)))
    snapshot = [SimpleNamespace(name="vllm:spec_decode_num_drafts", value=3),
                SimpleNamespace(name="vllm:spec_decode_num_drafts", value=2),  # a second engine's series
                SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens", value=7),
                SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens_per_pos", values=[4, 3]),
                SimpleNamespace(name="vllm:num_requests_running", value=1)]
    assert vllm_baseline.spec_counters(snapshot) == {"drafts": 5, "draft_tokens": 0, "accepted_tokens": 7}


def test_the_speculative_table_sets_vllm_beside_ours():
    """Formatting and the greedy comparison; the numbers are made up."""
    def record(system_kind, speculation, itl, tok_s, digests=None, rep=1, workload="edit"):
        r = {"workload": workload, "streams": 1, "speculation": speculation, "rep": rep, "prompt_tokens": [500],
             "max_tokens": 128, "itl_ms": itl, "tokens_per_s": tok_s, "acceptance_rate": 0.8 if speculation != "off" else None,
             "tokens_per_verify": 4.0 if speculation != "off" else None, "draft_cost": None}
        return {**r, "kind": "vllm_speculative", "tokens_digest": digests} if system_kind == "vllm" else \
            {**r, "type": "speculative"}
    vllm = [record("vllm", "off", 4.0, 240.0, ["a", "b"]), record("vllm", "ngram", 2.0, 400.0, ["a", "c"]),
            record("vllm", "off", 4.0, 240.0, ["a", "b"], rep=2), record("vllm", "ngram", 2.0, 400.0, ["a", "b"], rep=2)]
    ours = [record("ours", "off", 3.0, 300.0), record("ours", "ngram", 1.0, 600.0)]
    lines = vllm_baseline.speculative_markdown(vllm, ours)
    assert "| edit | 1 | ours | ngram | 1.00 | 600.0 | 0.80 | 4.00 | 3.00x | 2.00x |" in lines
    assert "| edit | 1 | vLLM | ngram | 2.00 | 400.0 | 0.80 | 4.00 | 2.00x | 1.67x |" in lines
    assert "| edit | 1 | vLLM | off | 4.00 | 240.0 | - | - |  |  |" in lines
    assert "- vLLM ngram: greedy outputs identical to vLLM off in 3/4 requests" in lines
    assert vllm_baseline.markdown(vllm, ours).count("| edit | 1 |") == 4


def test_a_part_gets_the_parents_options_back_as_it_parses_them():
    """part_argv: what the parent parsed, spelt again for the part's own process; --rate's several
    rates survive the round trip, and no rate (its default, an empty list) is left out."""
    for rate in (["--rate", "16,300"], []):
        args = vllm_baseline.parse_args(["--checkpoint", "/m", "--concurrencies", "1,8", *rate])
        argv = vllm_baseline.part_argv(args, "serving", {})
        assert argv[1:5] == ["-m", "benchmarks.vllm_baseline", "--part", "serving"]
        again = vllm_baseline.parse_args(argv[3:])
        assert (again.rate, again.concurrencies, again.checkpoint) == (args.rate, [1, 8], args.checkpoint)
    assert args.rate == [] and "--rate" not in argv
