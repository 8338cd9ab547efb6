"""Probe: do decoupled Python-backend models deliver their output tensors over gRPC, per instance
kind (KIND_CPU / KIND_GPU), per way of building the output tensor, sending from a worker thread or
from execute()? Run on a GPU machine with nvidia-pytriton and tritonclient installed:

    python3 tests/gpu/triton_probe.py [--out probe.jsonl]

Each variant is a tiny model that answers a request N with N responses OUT=[i, i+1, i+2] and a
final empty response. Prints one JSON line per variant and the server log's tail on failure.
Not a pytest module (needs a Triton server); docs/gpu.md records what it found.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

MODEL_PY = '''
import threading
import numpy as np
import triton_python_backend_utils as pb_utils

SOURCE, THREAD = {source!r}, {thread!r}


class TritonPythonModel:
    def initialize(self, args):
        self.threads, self.keep = [], []

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
            if THREAD == "inline":
                self.respond(sender, n)
            else:
                t = threading.Thread(target=self.respond, args=(sender, n), daemon=True)
                t.start()
                self.threads.append(t)
        return None

    def output(self, i):
        data = np.arange(i, i + 3, dtype=np.int32)
        if SOURCE == "numpy":
            return pb_utils.Tensor("OUT", data)
        import torch
        if SOURCE == "dlpack_cpu":
            return pb_utils.Tensor.from_dlpack("OUT", torch.from_numpy(data))
        t = torch.from_numpy(data).cuda()
        if SOURCE == "dlpack_gpu_kept":
            self.keep.append(t)  # the torch tensor outlives the send
        return pb_utils.Tensor.from_dlpack("OUT", t)

    def respond(self, sender, n):
        try:
            for i in range(n):
                sender.send(pb_utils.InferenceResponse(output_tensors=[self.output(i)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(repr(e))),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for t in self.threads:
            t.join(5)
'''

CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [ {{ name: "N" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_INT32 dims: [ -1 ] }} ]
instance_group [ {{ count: 1 kind: {kind} }} ]
'''

VARIANTS = [(kind, source, "worker") for kind in ("KIND_CPU", "KIND_GPU")
            for source in ("numpy", "dlpack_cpu", "dlpack_gpu", "dlpack_gpu_kept")]
VARIANTS += [("KIND_GPU", "numpy", "inline"), ("KIND_GPU", "dlpack_gpu", "inline")]


def write_repository(root: Path) -> list[str]:
    names = []
    for kind, source, thread in VARIANTS:
        name = f"{kind.split('_')[1].lower()}_{source}_{thread}"
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(CONFIG.format(name=name, kind=kind))
        (root / name / "1" / "model.py").write_text(MODEL_PY.format(source=source, thread=thread))
        names.append(name)
    return names


def ask(client, grpcclient, name: str, n: int = 3, timeout: float = 30.0) -> dict:
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inp = grpcclient.InferInput("N", [1], "INT32")
        inp.set_data_from_numpy(np.array([n], dtype=np.int32))
        client.async_stream_infer(name, [inp], request_id="1", enable_empty_final_response=True)
        got, errors = [], []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                result, error = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if error is not None:
                errors.append(str(error))
                break
            response = result.get_response()
            final = response.parameters.get("triton_final_response")
            outputs = {o.name: list(o.shape) for o in response.outputs}
            if outputs:
                arr = result.as_numpy("OUT")
                got.append({"shape": outputs.get("OUT"), "raw_bytes": sum(len(r) for r in response.raw_output_contents),
                            "values": None if arr is None else arr.tolist()})
            if final is not None and final.bool_param:
                break
        ok = len(got) == n and all(g["values"] == list(range(i, i + 3)) for i, g in enumerate(got))
        return {"responses": got, "errors": errors, "ok": ok}
    finally:
        client.stop_stream()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--grpc-port", type=int, default=8101)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import importlib.util

    import tritonclient.grpc as grpcclient

    from scripts import tritonserver

    # `import pytriton` needs gevent (absent on the GPU machine); the bundled server only needs
    # the package's files, so find them without importing it.
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        tritonserver._bundled_triton = lambda: bundled
    server_command = tritonserver.server_command

    repo = Path(tempfile.mkdtemp(prefix="triton-probe-"))
    names = write_repository(repo)
    # A model that fails to load (KIND_GPU without a GPU) must not take the others down.
    argv, env = server_command(repo, http_port=8100, grpc_port=args.grpc_port, metrics_port=8102,
                               extra_args=["--exit-on-error=false"])
    log_path = repo / "server.log"
    log = open(log_path, "w")
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    lines = []
    try:
        client = grpcclient.InferenceServerClient(f"localhost:{args.grpc_port}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if client.is_server_ready():
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if server.poll() is not None:
                break
            time.sleep(0.5)
        for name, (kind, source, thread) in zip(names, VARIANTS):
            try:
                ready = client.is_model_ready(name)
                res = ask(client, grpcclient, name) if ready else {"ok": False, "errors": ["model not ready"]}
            except Exception as e:  # noqa: BLE001
                res = {"ok": False, "errors": [f"{type(e).__name__}: {e}"]}
            line = json.dumps({"probe": name, "kind": kind, "source": source, "thread": thread, **res})
            lines.append(line)
            print(line, flush=True)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        Path(args.out).with_suffix(".server.log").write_text(log_path.read_text()[-20000:])
    if not all(json.loads(line)["ok"] for line in lines):
        print(log_path.read_text()[-4000:])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
