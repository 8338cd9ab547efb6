"""Real tritonservers on model_repository/, and a small gRPC/HTTP client for them.

The launch helpers every test package uses (tests/integration's fixtures, tests/deploy, tests/gpu,
benchmarks/): `launch` starts scripts/tritonserver.py on free ports, `start_servers` also waits for
readiness (retrying a port taken meanwhile), `stop_servers` and `TritonServer.stop` leave nothing of
a server behind. Each server runs in a session of its own, with its stubs and engine processes.

Module-level imports stay within what the client image has (no torch): see docs/deploy.md.

No request here sends the `triton_grpc_error` header (which makes a failed gRPC stream end with its
real status code): Triton 2.51's gRPC frontend, the one nvidia-pytriton bundles, has a
use-after-free in that mode (fixed upstream in triton-inference-server/server#8708) and crashes
within a few dozen failed streams, even for a trivial Python model. A stream error then carries its
message alone, which the model prefixes with the status (gemma_protocol.tag_error).
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import tritonclient.grpc as grpcclient
from gemma_protocol import INPUTS, RETURN_FLAGS
from tritonclient.utils import triton_to_np_dtype

from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gemma"
STARTUP_TIMEOUT_S = 300
INPUT_TYPES = {spec.name: spec.datatype for spec in INPUTS}
# What TritonServer.stream asks for unless a test says otherwise: every optional output of one choice
# but the TensorRT-LLM-named ones.
RETURN_ALL = {flag.name: True for flag in RETURN_FLAGS if flag.origin != "trtllm"}

# The tiny servers' limits: small, so the overload tests are cheap.
TINY_SERVER_ENV = {
    "GEMMA_MAX_NUM_SEQS": "8",
    "GEMMA_MAX_QUEUE_SIZE": "16",
    "GEMMA_MAX_MODEL_LEN": "512",
    "GEMMA_KV_CACHE_BYTES": str(8 << 20),
    "GEMMA_MAX_PROMPT_BYTES": str(64 << 10),
}
# A request that runs long past anything a test waits for, yet fits the tiny server's context
# (GEMMA_MAX_MODEL_LEN above) with a short prompt.
LONG = 400
# Greedy and EOS ignored (gemma_client's keywords): outputs are reproducible and exactly max_tokens long.
GREEDY = dict(temperature=0.0, ignore_eos=True)


@dataclass
class Result:
    """A request's responses, concatenated."""
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0  # summed over the responses (each carries its own count)
    responses: int = 0
    logprobs: Optional[list] = None  # the `logprobs` outputs' entries, when the server sent any


def make_inputs(prompt: str, **tensors) -> list:
    """gRPC input tensors; `tensors` maps input names (protocol.INPUTS) to Python values."""
    inputs = []
    for name, value in {"text_input": prompt, **tensors}.items():
        datatype = INPUT_TYPES[name]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if datatype == "BYTES":
            array = np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=np.object_)
        else:
            array = np.array(values, dtype=triton_to_np_dtype(datatype))
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs


@dataclass
class TritonServer:
    grpc_url: str  # host:port
    http_url: str  # http://host:port
    metrics_url: str  # http://host:port/metrics
    process: Optional[subprocess.Popen] = None  # None: a server this suite did not start
    log_path: Optional[Path] = None

    def log_tail(self, lines: int = 200) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log: this server was not started by the tests)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def ready(self) -> bool:
        """The model is ready and the metrics port answers (Triton may open it after the model is up)."""
        try:
            for url in (f"{self.http_url}/v2/models/{MODEL}/ready", self.metrics_url):
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status != 200:
                        return False
            return True
        except OSError:
            return False

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> bool:
        """Whether the model became ready before the server exited or `timeout` passed."""
        wait_for(lambda: self.ready() or (self.process is not None and self.process.poll() is not None),
                 timeout=timeout, period=0.25)
        return self.ready()

    def stream(self, prompt: str, cancel_when=None, timeout: float = 120, parameters: Optional[dict] = None,
               **tensors) -> Result:
        """One request on its own gRPC stream; a failure raises InferenceServerException.

        cancel_when(result) is asked after each response; when true, the stream is stopped with
        cancel_requests=True and the partial result returned. `parameters`: the request's parameters.
        Every optional output is asked for (RETURN_ALL) unless `tensors` sets the flag."""
        tensors = {**RETURN_ALL, **tensors}
        client = grpcclient.InferenceServerClient(self.grpc_url)
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        result = Result()
        try:
            client.async_stream_infer(MODEL, make_inputs(prompt, **tensors), parameters=parameters,
                                      enable_empty_final_response=True)
            while True:
                response, error = responses.get(timeout=timeout)
                if error is not None:
                    raise error
                if response.get_response().outputs:
                    result.responses += 1
                    result.text += response.as_numpy("text_output")[0].decode()
                    if (ids := response.as_numpy("output_ids")) is not None:
                        result.token_ids += ids.tolist()
                    if (reason := response.as_numpy("finish_reason")) is not None:
                        result.finish_reason = reason[0].decode()
                    if (num_input := response.as_numpy("num_input_tokens")) is not None:
                        result.num_input_tokens = int(num_input[0])
                    if (num_output := response.as_numpy("num_output_tokens")) is not None:
                        result.num_output_tokens += int(num_output[0])
                    logprobs = response.as_numpy("logprobs")
                    if logprobs is not None and (entries := json.loads(logprobs[0])) is not None:
                        result.logprobs = (result.logprobs or []) + entries
                    if cancel_when is not None and cancel_when(result):
                        client.stop_stream(cancel_requests=True)
                        return result
                if response.get_response().parameters["triton_final_response"].bool_param:
                    return result
        finally:
            client.stop_stream()
            client.close()

    def open_stream(self, on_error) -> grpcclient.InferenceServerClient:
        """A client with a started stream for many requests; on_error(error) gets each failure.
        Send with `send(client, prompt, **tensors)`."""
        client = grpcclient.InferenceServerClient(self.grpc_url)
        client.start_stream(callback=lambda result, error: error is not None and on_error(error))
        return client

    @staticmethod
    def send(client, prompt: str, **tensors) -> None:
        client.async_stream_infer(MODEL, make_inputs(prompt, **tensors))

    def post(self, path: str, payload: dict, timeout: float = 120) -> tuple[int, str]:
        """POST JSON to the HTTP endpoint; returns (status, body)."""
        request = urllib.request.Request(f"{self.http_url}{path}", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[str, float]:
        """gemma_* samples from /metrics, keyed by 'name{labels}' as Prometheus prints them."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            lines = r.read().decode().splitlines()
        return {key: float(value) for key, _, value in
                (line.rpartition(" ") for line in lines if line.startswith("gemma_"))}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(value for key, value in self.metrics().items()
                   if key.partition("{")[0] == name and all(w in key for w in want))

    def is_idle(self) -> bool:
        """Nothing running, queued or holding KV blocks (what earlier requests left has ended)."""
        return (self.metric("gemma_running_requests") == 0 and self.metric("gemma_queue_depth") == 0
                and self.metric("gemma_kv_blocks_used") == 0)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # Triton unloads the model: finalize() runs
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # The server runs in its own session: whatever is left of it (Python backend stubs of a
        # server that crashed or was killed) goes with the group instead of living on as orphans.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def engine_processes(server: TritonServer) -> list[int]:
    """The pids of the engine processes of a server this suite started (it runs in a session of its
    own, with its stubs and their engine processes)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"backend.engine_process" in (proc / "cmdline").read_bytes() \
                        and os.getsid(int(proc.name)) == server.process.pid:
                    pids.append(int(proc.name))
            except OSError:  # the process ended meanwhile
                continue
    return pids


INSTANCE_COUNT = re.compile(r"instance_group \[ \{ count: (\d+),")


def shipped_instance_count() -> int:
    """The count of model_repository/'s instance_group: the model instances per device as shipped."""
    (count,) = INSTANCE_COUNT.findall((ROOT / "model_repository" / MODEL / "config.pbtxt").read_text())
    return int(count)


def repository_with_instances(directory: Path, count: int) -> tuple[str, ...]:
    """A model repository in `directory` like model_repository/ but with `count` instances of the model
    (its instance_group's count), the model's code linked, not copied; returns the tritonserver
    arguments that serve it (scripts/tritonserver.py takes the last --model-repository)."""
    config = (ROOT / "model_repository" / MODEL / "config.pbtxt").read_text()
    config, found = INSTANCE_COUNT.subn(f"instance_group [ {{ count: {count},", config)
    assert found == 1, "config.pbtxt's instance_group changed: update this"
    (directory / MODEL).mkdir(parents=True)
    (directory / MODEL / "config.pbtxt").write_text(config)
    (directory / MODEL / "1").symlink_to(ROOT / "model_repository" / MODEL / "1")
    return ("--model-repository", str(directory))


def free_ports(n: int) -> list[int]:
    """`n` ports free now (another process may take one before it is bound: launch's callers retry)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch(log_path: Path, env: dict[str, str], server_args: tuple[str, ...] = ()) -> TritonServer:
    """scripts/tritonserver.py on model_repository/ and free ports, with `env` added to the environment
    (its GEMMA_* settings the only ones: the caller's shell's are left out); returns at once."""
    http_port, grpc_port, metrics_port = free_ports(3)
    # The model's GEMMA_<PARAMETER> overrides come only from `env`, never from the caller's shell.
    overrides = {f"GEMMA_{key.upper()}" for key in
                 re.findall(r'key:\s*"(\w+)"', (ROOT / "model_repository" / MODEL / "config.pbtxt").read_text())}
    base_env = {k: v for k, v in os.environ.items() if k not in overrides}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "tritonserver.py"),
             "--model-repository", str(ROOT / "model_repository"),
             "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
             *server_args],
            stdout=log, stderr=subprocess.STDOUT, env={**base_env, **env}, cwd=ROOT, start_new_session=True)
    return TritonServer(f"localhost:{grpc_port}", f"http://localhost:{http_port}",
                        f"http://localhost:{metrics_port}/metrics", process, log_path)


def start_servers(*configs: tuple) -> list[TritonServer]:
    """Start scripts/tritonserver.py on model_repository/ once per (log path, added environment[,
    tritonserver arguments]), all at once; return when every model is ready."""
    servers = [launch(*config) for config in configs]
    for i, config in enumerate(configs):
        for attempt in range(3):
            if servers[i].wait_ready():
                break
            servers[i].stop()
            # A free port can be taken by another process before the server binds it: retry.
            if "already in use" not in servers[i].log_tail() or attempt == 2:
                stop_servers(servers)
                raise RuntimeError(f"tritonserver did not become ready; its log:\n{servers[i].log_tail()}")
            servers[i] = launch(*config)
    return servers


def stop_servers(servers: list[TritonServer]) -> None:
    for s in servers:  # all at once: each takes a moment to unload
        if s.process is not None and s.process.poll() is None:
            s.process.send_signal(signal.SIGTERM)
    for s in servers:
        s.stop()
