"""Triton glue for the Gemma engine: declare the tensors, parse requests, stream responses back.

No model math here. `execute` parses each request (serving/requests.py) and submits it to the
engine, then returns at once (decoupled model): the engine thread hands each output to a queue,
and two small threads do the Triton-side work, so IPC to the server never stalls a decode step:
- the responder sends the responses serving/responses.py makes (one per text delta of a choice when
  streaming, else one at the end), the last with TRITONSERVER_RESPONSE_COMPLETE_FINAL, and polls for
  cancelled requests (then cancels them in the engine, which frees their KV blocks and finishes them);
- the monitor updates the metrics and notices an engine that died or stopped answering.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils
from gemma_protocol import INPUTS, OUTPUTS, ProtocolError, tag_error

from serving.config import bound_cpu_kernel_caches, model_settings

bound_cpu_kernel_caches()  # before torch is imported (by the modules below)

from backend.errors import EngineOverloadedError, InvalidRequestError  # noqa: E402
from serving.logprobs import logprobs_json  # noqa: E402
from serving.metrics import GemmaMetrics, RequestRecord  # noqa: E402
from serving.requests import GenerateRequest, StreamEchoError, parse_request  # noqa: E402
from serving.responses import ResponseBuilder  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# The TritonError codes this model sends, by the gRPC status name that also prefixes each message
# (gemma_protocol.tag_error): a gRPC stream error reaches the client as its message alone. Names, since
# pb_utils.TritonError exists only once the stub has set the module up, after this file's import.
ERROR_CODES = {"INVALID_ARGUMENT": "INVALID_ARG", "UNAVAILABLE": "UNAVAILABLE", "CANCELLED": "CANCELLED",
               "INTERNAL": "INTERNAL"}
CANCEL_POLL_S = 0.05  # how often in-flight requests are checked for cancellation
METRICS_PERIOD_S = 0.1
# A dead engine process is started again after each of these waits, until one start succeeds; after
# the last failed start the model stays unavailable (a start that fails that often will not recover).
ENGINE_RESTART_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0)


class _Request:
    """One in-flight request: where its responses go, its choices' engine handles, and its timings."""

    def __init__(self, sender, request: GenerateRequest, engine):
        self.sender = sender
        self.engine = engine  # the one its choices run in (a restart makes another)
        self.handles: list = []  # one per choice (n)
        self.responses = ResponseBuilder(request, lambda logprobs: logprobs_json(engine.tokenizer, logprobs))
        self.ended = False  # its final response (or error) went out
        self.submitted = time.monotonic()
        self.last_token_at: float | None = None
        self.record = RequestRecord("success", n=request.n)

    def note_tokens(self, count: int) -> None:
        """`count` tokens go out now. A gap g before k tokens counts as k inter-token gaps of g/k
        (as benchmarks/stats.py's Timeline counts them), so merged responses hide no tokens; the
        first k tokens are the first token and k - 1 gaps of nothing."""
        now = time.monotonic()
        if self.last_token_at is None:
            self.record.ttft_s = now - self.submitted
            self.record.inter_token_s.extend([0.0] * (count - 1))
        else:
            self.record.inter_token_s.extend([(now - self.last_token_at) / count] * count)
        self.last_token_at = now


def _ready_requests(items: list) -> list:
    """((request, choice), handle) notices in arrival order -> each choice once, with its handle.
    Every send costs the same whatever it carries (~0.1 ms through the stub), and with many streams
    one send per token falls behind the engine (measured: 64 streams of a 3 ms/step engine on an H200
    got 45% of its throughput): a responder that fell behind polls each stream once, for all its new
    tokens."""
    return list(dict(items).items())


# Responses are built from tensors that are reused. A pb_utils.Tensor costs the responder 2-5 us of
# the GIL to build and its send a shared-memory allocation; the stub saves a tensor to shared memory
# once (reference-counted) and Triton copies it into each response that holds it. So each value that
# recurs (every count, a finish_reason, a common token's text and id) gets its tensor once.
TENSOR_CACHE_SIZE = 4096  # tensors kept per output; a full cache starts again empty
CACHED_TEXT_CHARS = 16  # longer texts rarely recur
NUMPY_TYPES = {"TYPE_STRING": np.object_, "TYPE_FP32": np.float32, "TYPE_UINT32": np.uint32, "TYPE_INT32": np.int32}
OUTPUT_TYPES = {spec.name: NUMPY_TYPES[spec.triton_type] for spec in OUTPUTS}


def _array(name: str, values: list) -> np.ndarray:
    if OUTPUT_TYPES[name] is np.object_:
        return np.array([v.encode("utf-8") for v in values], dtype=np.object_)
    return np.array(values, dtype=OUTPUT_TYPES[name])


class _Tensors:
    """Makes each response's tensors (gemma_protocol.OUTPUTS); one-element values come from a cache
    per output. Only the responder thread uses it."""

    def __init__(self):
        self._cached: dict[str, dict] = {name: {} for name in OUTPUT_TYPES}

    def __call__(self, name: str, values: list) -> pb_utils.Tensor:
        value = values[0] if len(values) == 1 else None
        if value is None or isinstance(value, (list, float)) or (isinstance(value, str) and len(value) > CACHED_TEXT_CHARS):
            return pb_utils.Tensor(name, _array(name, values))
        cache = self._cached[name]
        tensor = cache.get(value)
        if tensor is None:
            if len(cache) >= TENSOR_CACHE_SIZE:
                cache.clear()
            tensor = cache[value] = pb_utils.Tensor(name, _array(name, values))
        return tensor


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
        settings = self.settings = model_settings(args)
        self.max_prompt_bytes = settings.max_prompt_bytes
        self.model_name = args["model_name"]
        self.unhealthy: str | None = None  # why the engine cannot serve (it died or stopped answering)
        self.engine = self._start_engine()
        self._restarter: threading.Thread | None = None
        self.metrics = GemmaMetrics(args["model_name"], args["model_version"], args["model_instance_name"])
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()  # ((request, choice), handle with new output) | None
        self._records: queue.SimpleQueue = queue.SimpleQueue()  # RequestRecord for the metrics
        self._active: set[_Request] = set()
        self._lock = threading.Lock()
        self._tensors = _Tensors()
        self._stopping = threading.Event()
        self._responder = threading.Thread(target=self._respond_loop, name="gemma-responder", daemon=True)
        self._monitor = threading.Thread(target=self._monitor_loop, name="gemma-metrics", daemon=True)
        self._responder.start()
        self._monitor.start()
        pb_utils.Logger.log_info(f"gemma: engine ready on {self.engine.device}: {self.engine.config}")

    def _start_engine(self):
        from backend.engine import Engine
        from backend.engine_process import EngineProcess

        # In a process of its own, the engine's loop does not share this process's GIL with the
        # responder thread (backend/engine_process.py).
        engine = self.settings.engine
        return EngineProcess(engine) if self.settings.engine_process else Engine.from_config(engine)

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
        if self.unhealthy is not None:
            return self._refuse(sender, "UNAVAILABLE", f"Model is unavailable due to unhealthy engine: {self.unhealthy}",
                                "overloaded")
        tensors = {spec.name: t.as_numpy() for spec in INPUTS
                   if (t := pb_utils.get_input_tensor_by_name(request, spec.name)) is not None}
        try:
            parsed = parse_request(tensors, request.parameters(), self.max_prompt_bytes)
        except StreamEchoError as e:  # the vLLM backend's words, which its clients compare verbatim
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)),
                        flags=FINAL)
            return self._records.put(RequestRecord("invalid"))
        except ProtocolError as e:
            return self._refuse(sender, "INVALID_ARGUMENT", str(e), "invalid")
        req = _Request(sender, parsed, self.engine)
        with self._lock:  # registered first: its final output may arrive before submit returns
            self._active.add(req)
        try:
            for choice in range(parsed.n):
                req.handles.append(req.engine.submit(
                    parsed.prompt, parsed.choice_params(choice),
                    on_ready=lambda handle, key=(req, choice): self._outputs.put((key, handle))))
        except Exception as e:
            with self._lock:
                self._active.discard(req)
            for handle in req.handles:  # the choices already queued: their outputs find the request ended
                handle.cancel()
            req.ended = True
            if isinstance(e, EngineOverloadedError):
                self._refuse(sender, "UNAVAILABLE", str(e), "overloaded")
            elif isinstance(e, InvalidRequestError):
                self._refuse(sender, "INVALID_ARGUMENT", str(e), "invalid")
            else:
                raise

    def finalize(self):
        self._stopping.set()  # first: the monitor's engine.stats() would be refused during the shutdown
        self._monitor.join()
        if self._restarter is not None:  # a start under way finishes (and stops what it started)
            self._restarter.join()
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
            for (req, choice), handle in _ready_requests(items):
                try:
                    out = handle.poll()  # detokenizes here, off the engine thread
                    if out is not None:
                        self._respond(req, choice, out)
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
            if req.handles and req.sender.is_cancelled():
                for handle in req.handles:
                    handle.cancel()  # the engine frees its KV blocks and sends a final "cancelled"

    def _respond(self, req: _Request, choice: int, out) -> None:
        if req.ended:  # a sibling choice ended the request with an error
            return
        record = req.record
        if out.token_ids:
            req.note_tokens(len(out.token_ids))
            record.output_tokens += len(out.token_ids)
        if out.finish_reason in ("cancelled", "error"):
            self._end(req)
            for handle in req.handles:
                handle.cancel()
            record.outcome = record.finish_reason = out.finish_reason
            if out.finish_reason == "cancelled":
                req.sender.send(_error("CANCELLED", "request cancelled"), flags=FINAL)
            elif req.engine.exit_error is not None:  # the engine died under it: retrying will do
                req.sender.send(_error("UNAVAILABLE", f"generation failed: {out.error}"), flags=FINAL)
            else:
                req.sender.send(_error("INTERNAL", f"generation failed: {out.error}"), flags=FINAL)
        else:
            response = req.responses.add(choice, out)
            if response is None:
                return
            tensors = [self._tensors(name, values) for name, values in response.values.items()]
            if not response.final:
                req.sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
                return
            self._end(req)
            req.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)
            record.finish_reason = out.finish_reason
        record.prompt_tokens = out.num_prompt_tokens
        record.e2e_s = time.monotonic() - req.submitted
        self._records.put(record)

    def _end(self, req: _Request) -> None:
        req.ended = True
        with self._lock:
            self._active.discard(req)

    def _monitor_loop(self) -> None:
        logged = set()  # each error once, not every period (e.g. an engine process that has died)

        def log_once(e: Exception) -> None:
            if repr(e) not in logged:
                logged.add(repr(e))
                pb_utils.Logger.log_error(f"gemma: metrics: {e!r}")

        while not self._stopping.wait(METRICS_PERIOD_S):
            try:
                # Each metric update is an IPC call (~20 us), a few per generated token: under heavy
                # load the records may take longer than a period. They wait for the next one, so the
                # gauges that autoscalers and routers read never go stale.
                deadline = time.monotonic() + METRICS_PERIOD_S
                while time.monotonic() < deadline:
                    try:
                        self.metrics.record(self._records.get_nowait())
                    except queue.Empty:
                        break
            except Exception as e:
                log_once(e)
            engine = self.engine
            try:
                stats = engine.stats()  # also the engine's health check: refused once it died, or times out
            except Exception as e:
                log_once(e)
                # Only the engine serving now: one a restart already replaced may fail meanwhile.
                if not self._stopping.is_set() and self.unhealthy is None and engine is self.engine:
                    self._mark_unhealthy(str(e), engine)
                continue
            try:
                self.metrics.set_engine_stats(stats)
            except Exception as e:
                log_once(e)

    def _mark_unhealthy(self, cause: str, dead) -> None:
        """The engine died or stopped answering: refuse requests until it is back. With the vLLM
        backend's ENABLE_VLLM_HEALTH_CHECK, unload the model instead, so that it reads as not ready
        and the orchestrator restarts the server (Triton unloads only in model control mode
        explicit); otherwise start a fresh engine here."""
        self.unhealthy = cause
        pb_utils.Logger.log_error(f"gemma: the engine is unhealthy: {cause}")
        if self.settings.unload_when_unhealthy:
            try:
                pb_utils.unload_model(self.model_name)
            except Exception as e:  # noqa: BLE001 - e.g. model control mode none
                pb_utils.Logger.log_error(f"gemma: could not unload the unhealthy model: {e!r}")
        else:
            self._restarter = threading.Thread(target=self._restart_engine, args=(dead,), name="gemma-restart",
                                               daemon=True)
            self._restarter.start()

    def _restart_engine(self, dead) -> None:
        dead.shutdown()  # reaps the dead process (its requests have already ended)
        for attempt, delay in enumerate(ENGINE_RESTART_DELAYS_S, start=1):
            if self._stopping.wait(delay):
                return
            try:
                engine = self._start_engine()
            except Exception as e:  # noqa: BLE001 - logged; the next attempt may succeed
                pb_utils.Logger.log_error(f"gemma: engine restart {attempt} failed: {e!r}")
                continue
            if self._stopping.is_set():  # finalize began meanwhile: it must not be left running
                engine.shutdown()
                return
            self.engine, self.unhealthy = engine, None
            self.metrics.count_engine_restart()
            pb_utils.Logger.log_info(f"gemma: engine restarted (attempt {attempt})")
            return
        pb_utils.Logger.log_error(f"gemma: the engine did not restart after {len(ENGINE_RESTART_DELAYS_S)} "
                                  f"attempts; the model stays unavailable")
