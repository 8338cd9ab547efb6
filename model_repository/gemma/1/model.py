"""Triton glue for the Gemma engine: declare the tensors, parse requests, stream responses back.

No model math here. `execute` parses each request (serving/requests.py) and returns at once
(decoupled model); small threads do the rest, so neither tokenizing nor IPC to the server stalls
the intake of requests or a decode step:
- the intake thread tokenizes the prompts of the requests parsed so far, a batch of about one engine
  step's tokens at a time, and submits them to the engine (serving/intake.py); the engine thread
  hands each output to a queue;
- the responders send the responses serving/responses.py makes (one per text delta of a choice when
  streaming, else one at the end; or the error that ends the request), the last with
  TRITONSERVER_RESPONSE_COMPLETE_FINAL, as tensors from serving/tensors.py's cache, and poll for
  cancelled requests (then cancel them in the engine, which frees their KV blocks and finishes them);
  each request belongs to one of them, taken in turn;
- the monitor updates the metrics and notices an engine that died or stopped answering; it also
  exports the model's health (gemma_engine_state, gemma_heartbeat_timestamp_seconds), which the
  health probe reads (deploy/k8s/base/health.py): Triton 2.51 offers a Python model no way to make
  its own readiness false in model control mode none.
What each response holds and which error answers what are serving/'s rules; this file turns them into
pb_utils objects and sends them.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback

import triton_python_backend_utils as pb_utils
from gemma_protocol import INPUTS, OUTPUTS, ProtocolError

from serving.config import bound_cpu_kernel_caches, model_settings, shared_engine_name
from serving.intake import PromptIntake

bound_cpu_kernel_caches()  # before torch is imported (by the modules below)

from backend.engine import Engine  # noqa: E402
from backend.heap import quiet_collector  # noqa: E402
from backend.loader import start_engine  # noqa: E402
from serving.logprobs import logprobs_json  # noqa: E402
from serving.metrics import GemmaMetrics, RequestRecord  # noqa: E402
from serving.requests import GenerateRequest, parse_request  # noqa: E402
from serving.responses import (MODEL_FAILURE, SHUTTING_DOWN, ErrorResponse, ResponseBuilder, refusal,  # noqa: E402
                               unhealthy_refusal)
from serving.send_order import send_order  # noqa: E402
from serving.tensors import TensorCache  # noqa: E402
from serving.token_times import TokenTimes  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_POLL_S = 0.05  # how often in-flight requests are checked for cancellation
METRICS_PERIOD_S = 0.1


class EngineStartError(RuntimeError):
    """The engine did not start (a setting that does not fit, a checkpoint that failed its check):
    the model's load fails with the cause's message alone, not the engine's Python frames."""


class _Request:
    """One in-flight request: where its responses go, its choices' engine handles, and its timings."""

    def __init__(self, sender, request: GenerateRequest, engine, responder: "_Responder", received: float):
        self.sender = sender
        self.engine = engine  # the one its choices run in (a restart makes another)
        self.responder = responder  # the one thread that sends its responses and polls it
        self.handles: list = []  # one per choice (n)
        self.responses = ResponseBuilder(request, lambda logprobs: logprobs_json(engine.tokenizer, logprobs))
        self.times = TokenTimes(submitted=received)  # when execute took it: the intake's wait counts
        self.record = RequestRecord("success", n=request.n)


class _Responder:
    """A thread that sends the responses of the requests it owns and polls them for cancellation.
    A request belongs to one responder for its whole life, so its sender is never asked
    is_cancelled() while (or after) its final response goes out, which crashes Triton 2.51 (the
    response factory is freed by then). Each has its own tensor cache: Triton's stub saves a tensor
    to shared memory on its first send, which two threads must not do at once."""

    def __init__(self, name: str, records: queue.SimpleQueue):
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()  # ((request, choice), handle with new output) | None
        self._records = records  # RequestRecord for the metrics
        self._active: set[_Request] = set()
        self._lock = threading.Lock()
        self._tensors = TensorCache(pb_utils.Tensor)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def own(self, req: _Request) -> None:
        """Registered before its choices are submitted: its final output may arrive before submit returns."""
        with self._lock:
            self._active.add(req)

    def disown(self, req: _Request) -> None:
        with self._lock:
            self._active.discard(req)

    def notify(self, key: tuple[_Request, int], handle) -> None:
        """Called by the engine: that choice has new output to poll."""
        self._outputs.put((key, handle))

    def stop(self) -> set[_Request]:
        """Send what is queued, stop, and return the requests that never got a final response."""
        self._outputs.put(None)
        self._thread.join()
        with self._lock:
            orphans, self._active = self._active, set()
        return orphans

    def _loop(self) -> None:
        next_poll = time.monotonic() + CANCEL_POLL_S
        while True:
            try:
                items = [self._outputs.get(timeout=max(next_poll - time.monotonic(), 0))]
            except queue.Empty:
                items = []
            stopping = self._drain_into(items)
            for (req, choice), handle in send_order(items, has_started=_has_started):
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
        if req.responses.ended:  # e.g. a sibling choice ended the request with an error
            return
        record = req.record
        if out.token_ids:
            req.times.note(len(out.token_ids), time.monotonic())
            record.output_tokens += len(out.token_ids)
        if out.phases is not None:
            record.phases.append(out.phases)
        response = req.responses.add(choice, out, engine_died=req.engine.exit_error is not None)
        if response is None:
            return
        if isinstance(response, ErrorResponse):
            self.disown(req)  # its last response goes out now: no longer polled for cancellation
            for handle in req.handles:
                handle.cancel()
            req.sender.send(_error(response), flags=FINAL)
            record.outcome = response.outcome
        else:
            tensors = [self._tensors(name, values) for name, values in response.values.items()]
            if not response.final:
                req.sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
                return
            self.disown(req)
            req.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)
        record.finish_reason = out.finish_reason
        record.prompt_tokens = out.num_prompt_tokens
        record.ttft_s, record.inter_token_s = req.times.ttft_s, req.times.inter_token_s
        record.e2e_s = time.monotonic() - req.times.submitted
        self._records.put(record)


def _has_started(key: tuple[_Request, int]) -> bool:
    return key[0].times.last_token_at is not None


def _error(error: ErrorResponse) -> pb_utils.InferenceResponse:
    code = getattr(pb_utils.TritonError, error.code)  # serving/ names the code: it imports nothing of Triton
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(error.message, code))


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
        # This server's instances of the model on one device share one engine process: more stubs
        # to send responses, one batch (backend/engine_fronts.py).
        self.shared_engine = shared_engine_name(args, settings.engine) if settings.engine_process else None
        self.unhealthy: str | None = None  # why the engine cannot serve (it died or stopped answering)
        self.engine_state = "serving"  # serving, restarting or failed (serving/metrics.py, ENGINE_STATES)
        try:
            self.engine = self._start_engine()
        except Exception as e:
            pb_utils.Logger.log_verbose(f"gemma: the engine did not start: {traceback.format_exc()}")
            raise EngineStartError(str(e)) from None
        self._restarter: threading.Thread | None = None
        self.metrics = GemmaMetrics(args["model_name"], args["model_version"], args["model_instance_name"],
                                    native_histograms=settings.histograms == "native")
        self._records: queue.SimpleQueue = queue.SimpleQueue()  # RequestRecord for the metrics
        self._stopping = threading.Event()
        # A send waits for Triton's side with the GIL released (187 us p50 on the CPU VM, 32 us of it
        # the sender's CPU), so several responders keep several sends in flight (settings.responder_threads).
        self._responders = [_Responder(f"gemma-responder-{i}", self._records)
                            for i in range(settings.responder_threads)]
        self._next_responder = itertools.cycle(self._responders)
        self._intake = PromptIntake(lambda prompts: self.engine.tokenizer.encode_batch(prompts),
                                    self._submit, lambda taken, error: self._fail(taken[0], error),
                                    chunk_tokens=self.engine.config.max_num_batched_tokens)
        self._monitor = threading.Thread(target=self._monitor_loop, name="gemma-metrics", daemon=True)
        self._monitor.start()
        quiet_collector()  # GC pauses would stall the responders (an engine on a thread: its steps too)
        kv = self.engine.stats().kv_cache
        pb_utils.Logger.log_info(f"gemma: engine ready on {self.engine.device}: {self.engine.config}; KV cache "
                                 f"{kv.num_bytes} bytes, {kv.total_blocks} blocks of {kv.block_size} tokens")

    def is_ready(self) -> bool:
        """The model's readiness as Triton reports it, on Triton releases that ask (python_backend's
        user-defined is_ready, Triton 2.67 and later). Triton 2.51 never calls it: there the health
        probe reads gemma_engine_state instead."""
        return self.unhealthy is None

    def _start_engine(self, dead: Engine | None = None) -> Engine:
        # In a process of its own, the engine's loop does not share this process's GIL with the
        # responder thread (backend/engine_process.py).
        if dead is None:
            return start_engine(self.settings.engine, self.settings.engine_process, self.shared_engine)
        # A restart: the checkpoint the dead engine resolved and the tokenizer it checked. Loading the
        # tokenizer again grew the stub by ~120 MB a restart (measured: 10 restarts, 0.7 -> 1.9 GB).
        # The first instance to find a shared engine dead starts the next; the others join it.
        return Engine(dead.config, dead.tokenizer, self.settings.engine_process, self.shared_engine)

    def execute(self, requests):
        received = time.monotonic()
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._take_in(request, sender, received)
            except Exception as e:  # noqa: BLE001 - see _fail
                self._fail(sender, e)
        return None

    def _take_in(self, request, sender, received: float) -> None:
        if self.unhealthy is not None:
            return self._refuse(sender, unhealthy_refusal(self.unhealthy))
        # Triton has checked the names against the config; one inputs() call, not one per declared input.
        tensors = {t.name(): t.as_numpy() for t in request.inputs()}
        try:
            parsed = parse_request(tensors, request.parameters(), self.max_prompt_bytes)
        except ProtocolError as e:
            return self._refuse(sender, refusal(e))
        self._intake.put((sender, parsed, received), parsed.prompt)

    def _submit(self, taken: tuple, prompt_ids: list[int]) -> None:
        """The intake thread: a parsed request and its prompt's tokens -> the engine, one handle per choice."""
        sender, parsed, received = taken
        if self.unhealthy is not None:  # it failed since execute took the request in
            return self._refuse(sender, unhealthy_refusal(self.unhealthy))
        req = _Request(sender, parsed, self.engine, next(self._next_responder), received)
        req.responder.own(req)
        try:
            for choice in range(parsed.n):
                req.handles.append(req.engine.submit(
                    prompt_ids, parsed.choice_params(choice),
                    on_ready=lambda handle, key=(req, choice): req.responder.notify(key, handle)))
        except Exception as e:
            req.responder.disown(req)
            req.responses.end()
            for handle in req.handles:  # the choices already queued: their outputs find the request ended
                handle.cancel()
            if (answer := refusal(e)) is None:
                raise
            self._refuse(sender, answer)

    def _fail(self, sender, error: Exception) -> None:
        """A request that failed in execute or the intake gets MODEL_FAILURE. Nothing may escape
        either: the stub would answer the request without a final response, Triton would never
        release it, and unloading the model (Ctrl-C) would hang until Triton's exit timeout."""
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        pb_utils.Logger.log_error(f"gemma: request failed before reaching the engine: {trace}")
        try:
            self._refuse(sender, MODEL_FAILURE)
        except Exception as e:  # noqa: BLE001 - e.g. the request was answered already
            pb_utils.Logger.log_error(f"gemma: could not answer a failed request: {e!r}")

    def finalize(self):
        self._stopping.set()  # first: the monitor's engine.stats() would be refused during the shutdown
        self._monitor.join()
        if self._restarter is not None:  # a start under way finishes (and stops what it started)
            self._restarter.join()
        self._intake.stop()  # what execute took in reaches the engine, to be cancelled with the rest
        self.engine.shutdown()  # cancels what is in flight; their final outputs are still sent
        for responder in self._responders:
            for req in responder.stop():  # only if the engine stopped without a final output for them
                req.sender.send(_error(SHUTTING_DOWN), flags=FINAL)

    def _refuse(self, sender, answer: ErrorResponse) -> None:
        sender.send(_error(answer), flags=FINAL)
        self._records.put(RequestRecord(answer.outcome))

    def _monitor_loop(self) -> None:
        logged = set()  # each error once, not every period (e.g. an engine process that has died)

        def log_once(e: Exception) -> None:
            if repr(e) not in logged:
                logged.add(repr(e))
                pb_utils.Logger.log_error(f"gemma: metrics: {e!r}")

        while not self._stopping.wait(METRICS_PERIOD_S):
            try:
                # First: a stats() below that hangs (an engine that stopped answering) stops the
                # heartbeat too, so the model reads not ready until the engine is replaced.
                self.metrics.set_health(self.engine_state, time.time())
            except Exception as e:
                log_once(e)
            try:
                for _ in range(self._records.qsize()):  # those finished by now; later ones next period
                    self.metrics.record(self._records.get_nowait())
            except Exception as e:
                log_once(e)
            engine = self.engine
            try:
                stats = engine.stats()  # also the engine's health check: refused once it died, or times out
            except Exception as e:
                log_once(e)
                stats = None
                # Only the engine serving now: one a restart already replaced may fail meanwhile.
                if not self._stopping.is_set() and self.unhealthy is None and engine is self.engine:
                    self._mark_unhealthy(str(e), engine)
            try:
                # A shared engine's own gauges and counters come from one of its instances only.
                if stats is not None and engine.reports_engine_stats:
                    self.metrics.set_engine_stats(stats)
                self.metrics.flush()  # the period's updates, one IPC call per series that moved
            except Exception as e:
                log_once(e)

    def _mark_unhealthy(self, cause: str, dead) -> None:
        """The engine died or stopped answering: refuse requests until it is back. With the vLLM
        backend's ENABLE_VLLM_HEALTH_CHECK, unload the model instead, so that it reads as not ready
        and the orchestrator restarts the server (Triton unloads only in model control mode
        explicit); otherwise start a fresh engine here."""
        self.unhealthy = cause
        pb_utils.Logger.log_error(f"gemma: the engine is unhealthy: {cause}")
        self.engine_state = "failed" if self.settings.unload_when_unhealthy else "restarting"
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
        """A fresh engine after each of the settings' delays until one starts (serving/config.py,
        engine_restart_delays_s); after the last failed start the model stays unavailable."""
        dead.shutdown()  # reaps the dead process (its requests have already ended)
        delays = self.settings.engine_restart_delays_s
        for attempt, delay in enumerate(delays, start=1):
            if self._stopping.wait(delay):
                return
            try:
                engine = self._start_engine(dead)
            except Exception as e:  # noqa: BLE001 - logged; the next attempt may succeed
                pb_utils.Logger.log_error(f"gemma: engine restart {attempt} failed: {e!r}")
                failure = e
                continue
            if self._stopping.is_set():  # finalize began meanwhile: it must not be left running
                engine.shutdown()
                return
            self.engine, self.unhealthy, self.engine_state = engine, None, "serving"
            if engine.started_here:  # one shared engine's death: each instance restarts, one starts the engine
                self.metrics.count_engine_restart()
            pb_utils.Logger.log_info(f"gemma: engine restarted (attempt {attempt})")
            return
        # Every request from now on is refused naming both causes: what ended the engine, and why no
        # fresh one starts (a checkpoint gone, a GPU now full): what an operator has to fix.
        self.unhealthy = f"{self.unhealthy}; no restart succeeded ({len(delays)} attempts), the last failed: {failure}"
        self.engine_state = "failed"
        pb_utils.Logger.log_error(f"gemma: the engine did not restart after {len(delays)} attempts; the model "
                                  f"stays unavailable: {self.unhealthy}")
