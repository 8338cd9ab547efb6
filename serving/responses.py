"""What the model sends back for one request: its outputs -> the values of each response, or its error.

Plain data, no Triton: the Triton model (model_repository/gemma/1/model.py) turns each `Response` into
tensors and each `ErrorResponse` into a TritonError and sends it, so these rules are unit-tested
without a server. The responses are the vLLM backend's:
- streamed, one response per output of a choice, each value covering the tokens since the previous
  response (text, logprobs, num_output_tokens), the last one final; not streamed, one response at the
  end with each choice's whole text, after the prompt when the request echoes it;
- per-choice outputs hold one element per choice (n); `finish_reason` is "None" until a choice ends;
- only the outputs the request asked for (GenerateRequest.outputs), `text_output` always;
- a choice that ends "cancelled", "invalid", "overloaded" or "error" ends the whole request with an error, and nothing of it
  is sent after that.
Errors carry a Triton error code and a message prefixed with the gRPC status name
(gemma_protocol.tag_error): a gRPC stream error reaches the client as its message alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from gemma_protocol import ProtocolError, tag_error

from backend.errors import EngineOverloadedError, InvalidRequestError
from backend.outputs import RequestOutput
from backend.params import TokenLogprobs

from .logprobs import LOWEST_LOGPROB
from .requests import GenerateRequest, StreamEchoError

LogprobsText = Callable[[Sequence[TokenLogprobs]], str]
# The TritonError code of each gRPC status this model answers with (by pb_utils.TritonError's names).
TRITON_ERROR_CODES = {"INVALID_ARGUMENT": "INVALID_ARG", "UNAVAILABLE": "UNAVAILABLE", "CANCELLED": "CANCELLED",
                      "INTERNAL": "INTERNAL"}


@dataclass(frozen=True)
class Response:
    values: dict[str, list]  # output name -> one value per choice (output_log_probs: a list per choice)
    final: bool


@dataclass(frozen=True)
class ErrorResponse:
    """A request's last response, an error: the TritonError code's name and the client's message."""
    code: str  # a pb_utils.TritonError attribute: INVALID_ARG, UNAVAILABLE, CANCELLED or INTERNAL
    message: str
    outcome: str  # the request's outcome in the metrics: invalid, overloaded, cancelled or error


def error_response(status: str, message: str, outcome: str) -> ErrorResponse:
    """An error with gRPC status `status` (TRITON_ERROR_CODES), its message tagged with it."""
    return ErrorResponse(TRITON_ERROR_CODES[status], tag_error(status, message), outcome)


def refusal(error: Exception) -> Optional[ErrorResponse]:
    """How a request refused before it runs is answered: bad input is INVALID_ARGUMENT, a full queue
    UNAVAILABLE (retrying may succeed). None for any other exception: a failure of the model."""
    if isinstance(error, StreamEchoError):  # the vLLM backend's words, which its clients compare verbatim
        return ErrorResponse("INVALID_ARG", str(error), "invalid")
    if isinstance(error, (ProtocolError, InvalidRequestError)):
        return error_response("INVALID_ARGUMENT", str(error), "invalid")
    if isinstance(error, EngineOverloadedError):
        return error_response("UNAVAILABLE", str(error), "overloaded")
    return None


def unhealthy_refusal(cause: str) -> ErrorResponse:
    """The answer to a request that arrives while the engine is down (it died, or is starting again)."""
    return error_response("UNAVAILABLE", f"Model is unavailable due to unhealthy engine: {cause}", "overloaded")


# A request the model failed to process. The client gets no traceback (it holds server paths); the log does.
MODEL_FAILURE = error_response("INTERNAL", "the model failed to process the request", "error")
# A request still in flight when the model unloads, whose engine stopped without a final output for it.
SHUTTING_DOWN = error_response("CANCELLED", "the model is shutting down", "cancelled")


def ended_early(out: RequestOutput, engine_died: bool) -> ErrorResponse:
    """The error that ends a request when one of its choices ends "cancelled", "invalid", "overloaded"
    or "error": a constraint the engine could not compile is INVALID_ARGUMENT; a full queue, or a
    failure because the engine died under it, UNAVAILABLE (retrying will do); any other INTERNAL."""
    if out.finish_reason == "cancelled":
        return error_response("CANCELLED", "request cancelled", "cancelled")
    if out.finish_reason == "invalid":
        return error_response("INVALID_ARGUMENT", out.error, "invalid")
    if out.finish_reason == "overloaded":  # the shared engine's queue bound (backend/engine_core.py)
        return error_response("UNAVAILABLE", out.error, "overloaded")
    status = "UNAVAILABLE" if engine_died else "INTERNAL"
    return error_response(status, f"generation failed: {out.error}", "error")


@dataclass
class _Choice:
    finish_reason: Optional[str] = None
    cumulative_logprob: float = 0.0
    # Not streamed: everything so far, sent at the end.
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)


class ResponseBuilder:
    """One request's responses. Feed it each choice's RequestOutputs in order (`add`)."""

    def __init__(self, request: GenerateRequest, logprobs_text: LogprobsText):
        self._request, self._logprobs_text = request, logprobs_text
        self._choices = [_Choice() for _ in range(request.n)]
        self._num_prompt_tokens = 0  # every output says it
        self._num_cached_tokens = 0
        self.ended = False  # its last response (the final one, or an error) is made: later outputs make none

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self._choices)

    def end(self) -> None:
        """The request ended without a response from here (refused while its choices were being
        submitted): the outputs of the choices already submitted make none."""
        self.ended = True

    def add(self, choice: int, out: RequestOutput, engine_died: bool = False) -> Optional[Response | ErrorResponse]:
        """The response this output makes now, if any. `engine_died`: the engine that ran it has died
        since (which decides the error of a choice that ended "error")."""
        if self.ended:
            return None
        if out.finish_reason in ("cancelled", "invalid", "overloaded", "error"):
            self.ended = True
            return ended_early(out, engine_died)
        response = self._add(choice, out)
        self.ended = response is not None and response.final
        return response

    def _add(self, choice: int, out: RequestOutput) -> Optional[Response]:
        state = self._choices[choice]
        state.finish_reason = out.finish_reason
        self._num_prompt_tokens = out.num_prompt_tokens
        state.cumulative_logprob += sum(lp.logprob for lp in out.logprobs or ())
        self._num_cached_tokens = max(self._num_cached_tokens, out.num_cached_tokens)
        if self._request.stream:
            if not (out.token_ids or out.text) and not self.finished:
                return None
            news = [(out.text, out.token_ids, out.logprobs or []) if i == choice else ("", [], [])
                    for i in range(self._request.n)]
            return self._response(news)
        state.text.append(out.text)
        state.token_ids += out.token_ids
        state.logprobs += out.logprobs or []
        if not self.finished:
            return None
        echo = self._request.prompt if self._request.echo_prompt else ""
        return self._response([(echo + "".join(c.text), c.token_ids, c.logprobs) for c in self._choices])

    def _response(self, news: list[tuple[str, list[int], list[TokenLogprobs]]]) -> Response:
        asked = self._request.outputs
        values: dict[str, list] = {"text_output": [text for text, _, _ in news]}
        if "finish_reason" in asked:
            values["finish_reason"] = [str(c.finish_reason) for c in self._choices]
        for name in ("cumulative_logprob", "cum_log_probs"):
            if name in asked:
                values[name] = [c.cumulative_logprob for c in self._choices]
        if "logprobs" in asked:
            values["logprobs"] = ["null" if self._request.logprobs is None else self._logprobs_text(logprobs)
                                  for _, _, logprobs in news]
        if "num_input_tokens" in asked:
            values["num_input_tokens"] = [self._num_prompt_tokens]
        if "num_output_tokens" in asked:
            values["num_output_tokens"] = [len(ids) for _, ids, _ in news]
        if "output_log_probs" in asked:  # single-choice requests only (serving/requests.py)
            values["output_log_probs"] = [[_finite(lp.logprob) for lp in news[0][2]]]
        if "output_ids" in asked:
            values["output_ids"] = list(news[0][1])
        if "num_cached_tokens" in asked:
            values["num_cached_tokens"] = [self._num_cached_tokens]
        return Response(values, self.finished)


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOWEST_LOGPROB
