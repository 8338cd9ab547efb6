"""Triton glue for the Gemma engine: declare the tensors, parse requests, stream responses back.

No model math here. `execute` parses each request (serving/requests.py) and submits it to the
engine, then returns at once (decoupled model): the engine thread hands each output to a queue,
and two small threads do the Triton-side work, so IPC to the server never stalls a decode step:
- the responder sends one response per text delta (stream=true) or one at the end, the last with
  TRITONSERVER_RESPONSE_COMPLETE_FINAL, and polls for cancelled requests (then cancels them in
  the engine, which frees their KV blocks and finishes them);
- the monitor updates the metrics.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import TYPE_CHECKING

import numpy as np
import triton_python_backend_utils as pb_utils
from gemma_protocol import INPUTS, OUTPUTS, ProtocolError, tag_error

from backend.errors import EngineOverloadedError, InvalidRequestError
from serving.config import bound_cpu_kernel_caches, model_settings
from serving.logprobs import logprobs_json
from serving.metrics import GemmaMetrics, RequestRecord

# torch is imported by initialize, not here: Triton also loads this file in a short-lived process
# of its own just to call auto_complete_config, which then starts seconds sooner.
if TYPE_CHECKING:
    from serving.requests import GenerateRequest

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# The TritonError codes this model sends, by the gRPC status name that also prefixes each message
# (gemma_protocol.tag_error): a gRPC stream error reaches the client as its message alone. Names, since
# pb_utils.TritonError exists only once the stub has set the module up, after this file's import.
ERROR_CODES = {"INVALID_ARGUMENT": "INVALID_ARG", "UNAVAILABLE": "UNAVAILABLE", "CANCELLED": "CANCELLED",
               "INTERNAL": "INTERNAL"}
CANCEL_POLL_S = 0.05  # how often in-flight requests are checked for cancellation
METRICS_PERIOD_S = 0.1


class _Request:
    """One in-flight request: where its responses go and what it has produced so far."""

    def __init__(self, sender, request: GenerateRequest):
        self.sender = sender
        self.stream = request.stream
        self.echo = "" if request.stream or request.exclude_input_in_output else request.prompt
        self.handle = None
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs = [] if request.params.logprobs is not None else None  # the engine's TokenLogprobs
        self.submitted = time.monotonic()
        self.last_token_at: float | None = None
        self.record = RequestRecord("success")

    def note_tokens(self, count: int) -> None:
        """`count` tokens go out now. A gap g before k tokens counts as k inter-token gaps of g/k
        (as benchmarks/stats.py's Timeline counts them), so merged responses hide no tokens."""
        now = time.monotonic()
        if self.last_token_at is None:
            self.record.ttft_s = now - self.submitted
        else:
            self.record.inter_token_s.extend([(now - self.last_token_at) / count] * count)
        self.last_token_at = now


def _ready_requests(items: list) -> list:
    """(request, handle) notices in arrival order -> each request once, with its handle. Every send
    costs the same whatever it carries (~0.1 ms through the stub), and with many streams one send
    per token falls behind the engine (measured: 64 streams of a 3 ms/step engine on an H200 got 45%
    of its throughput): a responder that fell behind polls each stream once, for all its new tokens."""
    return list(dict(items).items())


# Responses are built from tensors that are reused. A pb_utils.Tensor costs the responder 2-5 us of
# the GIL to build and its send a shared-memory allocation; the stub saves a tensor to shared memory
# once (reference-counted) and Triton copies it into each response that holds it. So each value that
# recurs (every count, a finish_reason, a common token's text and id) gets its tensor once.
TENSOR_CACHE_SIZE = 4096  # tensors kept per output; a full cache starts again empty
CACHED_TEXT_CHARS = 16  # longer texts rarely recur


def _bytes_tensor(name: str, text: str) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


def _uint32_tensor(name: str, value: int) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([value], dtype=np.uint32))


class _TensorCache:
    """One output's tensors by value, each made once by `make(value)`."""

    def __init__(self, make):
        self._make, self._tensors = make, {}

    def __call__(self, value) -> pb_utils.Tensor:
        tensor = self._tensors.get(value)
        if tensor is None:
            if len(self._tensors) >= TENSOR_CACHE_SIZE:
                self._tensors.clear()
            tensor = self._tensors[value] = self._make(value)
        return tensor


class _Responses:
    """Makes the model's responses (gemma_protocol.OUTPUTS). Only the responder thread uses it."""

    def __init__(self):
        self.text = _TensorCache(lambda text: _bytes_tensor("text_output", text))
        self.finish_reason = _TensorCache(lambda reason: _bytes_tensor("finish_reason", reason))
        self.num_input_tokens = _TensorCache(lambda n: _uint32_tensor("num_input_tokens", n))
        self.num_output_tokens = _TensorCache(lambda n: _uint32_tensor("num_output_tokens", n))
        self.output_id = _TensorCache(lambda i: pb_utils.Tensor("output_ids", np.array([i], dtype=np.int32)))

    def __call__(self, text: str, finish_reason: str, out, token_ids, logprobs=None) -> pb_utils.InferenceResponse:
        tensors = [
            self.text(text) if len(text) <= CACHED_TEXT_CHARS else _bytes_tensor("text_output", text),
            self.finish_reason(finish_reason),
            self.num_input_tokens(out.num_prompt_tokens),
            self.num_output_tokens(out.num_output_tokens),
            self.output_id(token_ids[0]) if len(token_ids) == 1 else
            pb_utils.Tensor("output_ids", np.array(token_ids, dtype=np.int32)),
        ]
        if logprobs is not None:  # only requests that asked get the output
            tensors.append(_bytes_tensor("logprobs", logprobs))
        return pb_utils.InferenceResponse(output_tensors=tensors)


def _error(status: str, message: str) -> pb_utils.InferenceResponse:
    code = getattr(pb_utils.TritonError, ERROR_CODES[status])
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(tag_error(status, message), code))


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        for spec in INPUTS:
            config.add_input({"name": spec.name, "data_type": spec.triton_type,
                              "dims": list(spec.dims), "optional": spec.optional})
        for spec in OUTPUTS:
            config.add_output({"name": spec.name, "data_type": spec.triton_type, "dims": list(spec.dims)})
        config.set_max_batch_size(0)
        config.set_model_transaction_policy({"decoupled": True})
        return config

    def initialize(self, args):
        bound_cpu_kernel_caches()  # before torch is imported (below)
        from backend.engine import Engine
        from backend.engine_process import EngineProcess
        from serving.requests import parse_request

        self._parse_request = parse_request
        settings = model_settings(args)
        self.max_prompt_bytes = settings.max_prompt_bytes
        # In a process of its own, the engine's loop does not share this process's GIL with the
        # responder thread (backend/engine_process.py).
        self.engine = EngineProcess(settings.engine) if settings.engine_process else Engine.from_config(settings.engine)
        self.metrics = GemmaMetrics(args["model_name"], args["model_version"], args["model_instance_name"])
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()  # (request, handle with new output) | None
        self._records: queue.SimpleQueue = queue.SimpleQueue()  # RequestRecord for the metrics
        self._active: set[_Request] = set()
        self._lock = threading.Lock()
        self._response = _Responses()
        self._stopping = threading.Event()
        self._responder = threading.Thread(target=self._respond_loop, name="gemma-responder", daemon=True)
        self._monitor = threading.Thread(target=self._monitor_loop, name="gemma-metrics", daemon=True)
        self._responder.start()
        self._monitor.start()
        pb_utils.Logger.log_info(f"gemma: engine ready on {self.engine.device}: {self.engine.config}")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._submit(request, sender)
            except Exception:  # noqa: BLE001 - see below
                # Nothing may escape execute: the stub would answer the request without a final
                # response, Triton would never release it, and unloading the model (Ctrl-C) would
                # hang until Triton's exit timeout, leaving the stub behind. The client gets no
                # traceback (it holds server paths); the log does.
                pb_utils.Logger.log_error(f"gemma: request failed in execute: {traceback.format_exc()}")
                try:
                    self._refuse(sender, "INTERNAL", "the model failed to process the request", "error")
                except Exception as e:  # noqa: BLE001 - e.g. the request was answered already
                    pb_utils.Logger.log_error(f"gemma: could not answer a failed request: {e!r}")
        return None

    def _submit(self, request, sender) -> None:
        tensors = {spec.name: t.as_numpy() for spec in INPUTS
                   if (t := pb_utils.get_input_tensor_by_name(request, spec.name)) is not None}
        try:
            parsed = self._parse_request(tensors, request.parameters(), self.max_prompt_bytes)
        except ProtocolError as e:
            return self._refuse(sender, "INVALID_ARGUMENT", str(e), "invalid")
        req = _Request(sender, parsed)
        with self._lock:  # registered first: its final output may arrive before submit returns
            self._active.add(req)
        try:
            req.handle = self.engine.submit(parsed.prompt, parsed.params,
                                            on_ready=lambda handle, r=req: self._outputs.put((r, handle)))
        except Exception as e:
            with self._lock:
                self._active.discard(req)
            if isinstance(e, EngineOverloadedError):
                self._refuse(sender, "UNAVAILABLE", str(e), "overloaded")
            elif isinstance(e, InvalidRequestError):
                self._refuse(sender, "INVALID_ARGUMENT", str(e), "invalid")
            else:
                raise

    def finalize(self):
        self._stopping.set()  # first: the monitor's engine.stats() would be refused during the shutdown
        self._monitor.join()
        self.engine.shutdown()  # cancels what is in flight; their final outputs are still sent
        self._outputs.put(None)
        self._responder.join()
        with self._lock:
            orphans, self._active = self._active, set()
        for req in orphans:  # only if the engine stopped without a final output for them
            req.sender.send(_error("CANCELLED", "the model is shutting down"), flags=FINAL)

    def _refuse(self, sender, status: str, message: str, outcome: str) -> None:
        sender.send(_error(status, message), flags=FINAL)
        self._records.put(RequestRecord(outcome))

    def _respond_loop(self) -> None:
        """Owns the response senders of submitted requests: sends their responses and polls them for
        cancellation. One thread, so a sender is never asked is_cancelled() while (or after) its
        final response goes out, which crashes Triton 2.51 (the response factory is freed by then)."""
        next_poll = time.monotonic() + CANCEL_POLL_S
        while True:
            try:
                items = [self._outputs.get(timeout=max(next_poll - time.monotonic(), 0))]
            except queue.Empty:
                items = []
            stopping = self._drain_into(items)
            for req, handle in _ready_requests(items):
                try:
                    out = handle.poll()  # detokenizes here, off the engine thread
                    if out is not None:
                        self._respond(req, out)
                except Exception as e:  # a client gone mid-send must not stop the other streams
                    pb_utils.Logger.log_error(f"gemma: responder: {e!r}")
            if stopping:
                return
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + CANCEL_POLL_S
                try:
                    self._cancel_abandoned()
                except Exception as e:
                    pb_utils.Logger.log_error(f"gemma: responder: {e!r}")

    def _drain_into(self, items: list) -> bool:
        """Move every queued output into `items`; True if the stop sentinel (None) was among them."""
        while items and items[-1] is not None:
            try:
                items.append(self._outputs.get_nowait())
            except queue.Empty:
                break
        if items and items[-1] is None:
            items.pop()
            return True
        return False

    def _cancel_abandoned(self) -> None:
        with self._lock:
            active = list(self._active)
        for req in active:
            if req.handle is not None and req.sender.is_cancelled():
                req.handle.cancel()  # the engine frees its KV blocks and sends a final "cancelled"

    def _respond(self, req: _Request, out) -> None:
        if out.token_ids:
            req.note_tokens(len(out.token_ids))
        if out.finish_reason is None:
            if not req.stream:
                req.text.append(out.text)
                req.token_ids.extend(out.token_ids)
                if req.logprobs is not None:
                    req.logprobs.extend(out.logprobs)
            elif out.text or out.token_ids:
                req.sender.send(self._response(out.text, "", out, out.token_ids, self._logprobs_json(out.logprobs)))
            return
        with self._lock:
            self._active.discard(req)
        record = req.record
        record.prompt_tokens, record.output_tokens = out.num_prompt_tokens, out.num_output_tokens
        if out.finish_reason == "cancelled":
            record.outcome = "cancelled"
            req.sender.send(_error("CANCELLED", "request cancelled"), flags=FINAL)
        elif out.finish_reason == "error":
            record.outcome = "error"
            req.sender.send(_error("INTERNAL", f"generation failed: {out.error}"), flags=FINAL)
        elif req.stream:
            req.sender.send(self._response(out.text, out.finish_reason, out, out.token_ids,
                                           self._logprobs_json(out.logprobs)), flags=FINAL)
        else:
            text = req.echo + "".join(req.text) + out.text
            logprobs = None if req.logprobs is None else req.logprobs + out.logprobs
            req.sender.send(self._response(text, out.finish_reason, out, req.token_ids + list(out.token_ids),
                                           self._logprobs_json(logprobs)), flags=FINAL)
        self._records.put(record)

    def _logprobs_json(self, logprobs) -> str | None:
        return None if logprobs is None else logprobs_json(self.engine.tokenizer, logprobs)

    def _monitor_loop(self) -> None:
        last_error = None  # logged once, not every period (e.g. an engine process that has died)
        while not self._stopping.wait(METRICS_PERIOD_S):
            try:
                while True:
                    try:
                        self.metrics.record(self._records.get_nowait())
                    except queue.Empty:
                        break
                self.metrics.set_engine_stats(self.engine.stats())
            except Exception as e:
                if repr(e) != last_error:
                    pb_utils.Logger.log_error(f"gemma: metrics: {e!r}")
                last_error = repr(e)
