"""The HTTP routes: /v1/models, /v1/completions, /v1/chat/completions and /health.

`create_app(settings)` builds the FastAPI app; one AsyncGemmaClient (one gRPC channel to Triton)
serves all requests. A handler checks the request (schemas.py, Guard), turns it into one Triton
request per choice, and answers with a whole response or an event stream. A client that
disconnects - while a whole response is generated, or mid-stream - cancels its Triton requests.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Awaitable, Optional, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from gemma_client import AsyncGemmaClient, GemmaClientError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .choices import Choices, collect
from .engine_health import engine_problem
from .errors import APIError, from_client_error, invalid_request
from .guard import Guard
from .prompts import CHAT_STOP, chat_prompt
from .responses import ChatFormat, CompletionFormat, ResponseFormat, stream_events
from .sampling import ChoiceRequest, choice_requests
from .schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest
from .settings import Settings
from .sse import EventStream
from .structured import one_constraint, response_format_constraint
from .tools import tool_plan

log = logging.getLogger("gateway")
HEALTH_TIMEOUT_S = 2.0
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; only the access log sees it
T = TypeVar("T")


class _ClientGone(Exception):
    pass


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or Settings.from_env()
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # cached_tokens: for usage.prompt_tokens_details.cached_tokens.
        app.state.client = AsyncGemmaClient(settings.triton_url, settings.triton_model, cached_tokens=True)
        yield
        await app.state.client.close()

    app = FastAPI(title="Gemma OpenAI-compatible API", lifespan=lifespan)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.add_exception_handler(APIError, _answer_error)
    app.add_exception_handler(Exception, _answer_bug)  # a bug: the client still gets OpenAI's shape
    app.add_exception_handler(RequestValidationError, lambda request, e: _validation_error(e).response())
    app.add_exception_handler(StarletteHTTPException,  # unknown route, wrong method
                              lambda request, e: APIError(e.status_code, str(e.detail)).response())
    app.add_exception_handler(_ClientGone, lambda request, e: Response(status_code=CLIENT_CLOSED_REQUEST))
    v1 = APIRouter(prefix="/v1")

    def model_card() -> dict:
        return {"id": settings.served_model_name, "object": "model", "created": started, "owned_by": "gemma-triton"}

    def check_model(name: str) -> None:
        if name != settings.served_model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{settings.served_model_name}'", param="model", code="model_not_found")

    @v1.get("/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id}")
    async def get_model(model_id: str) -> dict:
        check_model(model_id)
        return model_card()

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        constraint, constraint_param = one_constraint(
            structured_outputs=body.structured_outputs, response_format=response_format_constraint(body.response_format))
        requests = choice_requests(body, body.prompt, structured_outputs=constraint)
        return await answer(request, body, requests, CompletionFormat(body.model), prompt_param="prompt",
                            constraint_param=constraint_param)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        tools = tool_plan(body)
        response_format = response_format_constraint(body.response_format)
        if tools is not None and response_format is not None:
            raise invalid_request("a JSON 'response_format' cannot be combined with tools unless 'tool_choice' "
                                  "is 'none': the answer is constrained either to the format or to the tools",
                                  param="response_format")
        constraint, constraint_param = one_constraint(
            structured_outputs=body.structured_outputs, response_format=response_format,
            tools=tools.constraint() if tools is not None else None)
        prompt = chat_prompt(body.messages, tools.instructions() if tools is not None else None)
        requests = choice_requests(body, [prompt], extra_stop=CHAT_STOP, structured_outputs=constraint)
        return await answer(request, body, requests, ChatFormat(body.model, tools), prompt_param="messages",
                            constraint_param=constraint_param)

    async def answer(request: Request, body: GenerationRequest, requests: list[ChoiceRequest],
                     fmt: ResponseFormat, prompt_param: str, constraint_param: Optional[str]) -> Response:
        if len(requests) > settings.max_choices:
            raise invalid_request(f"{len(requests)} choices (n x prompts) asked for; at most "
                                  f"{settings.max_choices} per request", param="n")
        choices = Choices(request.app.state.client, requests, stream=body.stream)
        try:
            if not body.stream:
                wholes = await _unless_client_leaves(request, collect(choices, len(requests)))
                return JSONResponse(fmt.response(wholes, requests))
            # Refusals (bad argument, overload) come before the first token: answer them with a status.
            await _unless_client_leaves(request, choices.wait_first())
        except BaseException as e:
            await choices.aclose()
            if isinstance(e, GemmaClientError):
                raise from_client_error(e, prompt_param, constraint_param) from None
            raise
        events = stream_events(fmt, choices, requests, body.include_usage, prompt_param, constraint_param)
        return EventStream(events, release=choices.aclose)

    metrics_url = settings.engine_metrics_url()

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """200 when Triton and its model are ready and the model's engine serves, else 503 (and why).
        Triton 2.51 reads the model ready while its engine is restarting or has failed: the engine's
        state comes from Triton's metrics (engine_health.py)."""
        try:
            await request.app.state.client.check_ready(timeout=HEALTH_TIMEOUT_S)
        except GemmaClientError as e:
            return JSONResponse({"status": "unavailable", "reason": str(e)}, status_code=503)
        if metrics_url is not None:
            problem = await asyncio.to_thread(engine_problem, metrics_url, settings.triton_model)
            if problem is not None:
                return JSONResponse({"status": "unavailable", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    app.include_router(v1)
    return app


def _answer_error(request: Request, error: APIError) -> Response:
    if error.status >= 500:
        log.warning("%s %s: %s %s", request.method, request.url.path, error.status, error.message)
    return error.response()


def _answer_bug(request: Request, error: Exception) -> Response:
    # Starlette raises the exception again after this answer, and uvicorn logs its traceback.
    return APIError(500, f"internal error in the gateway: {error!r}", code="internal_error").response()


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise _ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _validation_error(error: RequestValidationError) -> APIError:
    """The first problem pydantic found, in OpenAI's words, naming the field."""
    problems = list(error.errors())
    first = next((p for p in problems if p["type"] == "extra_forbidden"), problems[0])
    loc = [part for part in first["loc"] if part != "body"]
    if "field" in first.get("ctx", {}):  # a rule between fields (schemas._field_error) names the field itself
        loc.append(first["ctx"]["field"])
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", first["msg"])
        return invalid_request(f"request body is not valid JSON: {detail}", code="invalid_json")
    if isinstance(error.body, bytes):  # FastAPI parses JSON only when the request says it is JSON
        return invalid_request("request body must be JSON, sent with 'Content-Type: application/json'",
                               code="invalid_json")
    if not loc:
        return invalid_request("request body must be a JSON object")
    if first["type"] in ("model_attributes_type", "dict_type"):
        first = {**first, "msg": "must be a JSON object"}
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if first["type"] == "extra_forbidden":
        return invalid_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if first["type"] == "missing":
        return invalid_request(f"'{param}' is required", param, "missing_required_parameter")
    message = str(first["msg"]).removeprefix("Value error, ")
    return invalid_request(f"'{param}': {message}", param, "invalid_value")
