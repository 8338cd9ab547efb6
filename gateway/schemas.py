"""The OpenAI requests this gateway takes, as strict pydantic models: one table of what is accepted.

Unknown fields are refused (extra="forbid") and types are not coerced ("8" is not 8), so every
mistake is a 400 naming its field (errors.py, app.py). Fields are OpenAI's, with OpenAI's ranges.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 4  # as OpenAI
# A completion without max_tokens gets OpenAI's (and vLLM's) 16; a chat completion without it as many
# tokens as the context leaves room for, as theirs.
COMPLETION_DEFAULT_MAX_TOKENS = 16

# Top alternatives per token a request may ask for (the engine's limit; OpenAI's chat allows 20 too).
MAX_TOP_LOGPROBS = 20

STRICT = ConfigDict(extra="forbid", strict=True)  # unknown fields refused, no type coercion
# OpenAI's rule for function and response-format names.
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class JSONSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")  # absent: any JSON object
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    """`response_format`: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {...}} (structured.py turns it into the engine's constraint)."""
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchema] = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise _field_error("json_schema", "is required when 'type' is 'json_schema', and only then")
        return self


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False  # a last chunk with `usage` (and `usage: null` in every other chunk)


class GenerationRequest(BaseModel):
    """What completions and chat completions share."""
    model_config = STRICT

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)
    stop: Optional[list[str]] = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted, not used
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    # Not OpenAI's: vLLM's extension of the same name. Generation goes on past EOS until max_tokens
    # or a stop string (a benchmark's requests all get exactly max_tokens).
    ignore_eos: bool = False
    # Not OpenAI's: vLLM's extension of the same name. Stop strings, the chat's end of turn and EOS are
    # not honoured before this many tokens (AIPerf and genai-perf send it, beside ignore_eos, to fix
    # the output length); at most max_tokens (the engine's 400 otherwise).
    min_tokens: int = Field(0, ge=0)
    response_format: Optional[ResponseFormat] = None  # structured.py: the constraint it asks for
    # Not OpenAI's: vLLM's extension of the same name, passed to the engine as it is: one of `json`,
    # `regex`, `choice`, `grammar`, `json_object` (docs/gateway.md, Structured outputs).
    structured_outputs: Optional[dict[str, Any]] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_more_stop_strings(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            if len(value) > MAX_STOP_STRINGS:
                raise PydanticCustomError("too_many", "at most {limit} stop sequences", {"limit": MAX_STOP_STRINGS})
            if not all(isinstance(s, str) and s for s in value):
                raise PydanticCustomError("stop_type", "stop sequences must be non-empty strings")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: Optional[StreamOptions], info: ValidationInfo) -> Optional[StreamOptions]:
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError("stream_options", "only allowed when 'stream' is true")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def max_output_tokens(self) -> Optional[int]:
        """The engine's `max_tokens`; None: as many as the context leaves room for."""
        return self.max_tokens

    @property
    def num_top_logprobs(self) -> Optional[int]:
        """The engine's `logprobs`: how many alternatives per token; None: no logprobs at all."""
        return None


class CompletionRequest(GenerationRequest):
    """POST /v1/completions."""
    prompt: list[str]  # a string, or a list of them (n choices each)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token

    @property
    def num_top_logprobs(self) -> Optional[int]:
        return self.logprobs

    @property
    def max_output_tokens(self) -> int:
        return COMPLETION_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, value: Any) -> Any:
        prompts = [value] if isinstance(value, str) else value
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
            raise PydanticCustomError("prompt_type", "must be a string or a non-empty list of strings "
                                                     "(token ids are not supported)")
        if not all(prompts):
            raise PydanticCustomError("prompt_empty", "prompts must not be empty")
        return prompts


class FunctionCall(BaseModel):
    model_config = STRICT
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call an assistant message made (sent back in the conversation)."""
    model_config = STRICT
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or a list of {"type": "text", "text": ...} parts (joined by newlines). May be null or
    # absent only in an assistant message that holds tool_calls.
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # assistant messages only
    tool_call_id: Optional[str] = None           # tool messages only: the call this is the result of
    refusal: Optional[str] = None                # accepted on assistant messages (the SDK echoes it), unused

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                    and set(part) == {"type", "text"}):
                raise PydanticCustomError("content_part", "only text content parts "
                                                          "({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise _field_error("tool_calls", "only assistant messages hold tool_calls")
        if self.tool_calls is not None and not self.tool_calls:
            raise _field_error("tool_calls", "must not be empty (leave it out instead)")
        if self.refusal is not None and self.role != "assistant":
            raise _field_error("refusal", "only assistant messages hold a refusal")
        if self.role == "tool":
            if self.tool_call_id is None:
                raise _field_error("tool_call_id", "a tool message needs the tool_call_id of the call it answers")
        elif self.tool_call_id is not None:
            raise _field_error("tool_call_id", "only tool messages hold a tool_call_id")
        if self.content is None and not self.tool_calls:
            raise _field_error("content", "is required (it may be left out only in an assistant message "
                                          "with tool_calls)")
        return self


def _field_error(field: str, message: str) -> PydanticCustomError:
    # A model validator's error carries no field: app.py reads it from the "field" context.
    return PydanticCustomError("field_rule", "{message}", {"field": field, "message": message})


class FunctionDefinition(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=NAME_PATTERN)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema; absent: the function takes no arguments
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = STRICT
    name: str


TOOL_CHOICE_MODES = ("none", "auto", "required")


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Tool]] = Field(None, min_length=1)
    # "none", "auto" (the default with tools), "required", or a NamedToolChoice (tools.py has what each does).
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None  # false: at most one call (default: any number)

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: Optional[list[Tool]]) -> Optional[list[Tool]]:
        names = [tool.function.name for tool in tools or ()]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise PydanticCustomError("tool_names", "function names must be distinct; repeated: {names}",
                                      {"names": ", ".join(duplicated)})
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        if isinstance(choice, dict):
            try:
                choice = NamedToolChoice.model_validate(choice, strict=True)
            except ValidationError as e:
                problem = e.errors()[0]
                where = ".".join(str(part) for part in problem["loc"])
                raise PydanticCustomError("tool_choice", "{where}: {problem}",
                                          {"where": where, "problem": problem["msg"]}) from None
        elif choice not in (None, *TOOL_CHOICE_MODES):
            raise PydanticCustomError("tool_choice", "must be 'none', 'auto', 'required' or {named}",
                                      {"named": "{'type': 'function', 'function': {'name': ...}}"})
        if choice is None or choice == "none":
            return choice
        tools = info.data.get("tools")
        if not tools:
            raise PydanticCustomError("tool_choice", "'tool_choice' is only allowed when 'tools' are given")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
            raise PydanticCustomError("tool_choice", "no function named '{name}' among the tools",
                                      {"name": choice.function.name})
        return choice

    @field_validator("top_logprobs")
    @classmethod
    def _only_with_logprobs(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        if value is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("top_logprobs", "'logprobs' must be true when 'top_logprobs' is given")
        return value

    @property
    def num_top_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_output_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
