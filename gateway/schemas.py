"""The OpenAI requests this gateway takes, as strict pydantic models: one table of what is accepted.

Unknown fields are refused (extra="forbid") and types are not coerced ("8" is not 8), so every
mistake is a 400 naming its field (errors.py, app.py). Fields are OpenAI's, with OpenAI's ranges.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 4  # as OpenAI
# A completion without max_tokens gets OpenAI's (and vLLM's) 16; a chat completion without it as many
# tokens as the context leaves room for, as theirs.
COMPLETION_DEFAULT_MAX_TOKENS = 16

# Top alternatives per token a request may ask for (the engine's limit; OpenAI's chat allows 20 too).
MAX_TOP_LOGPROBS = 20

STRICT = ConfigDict(extra="forbid", strict=True)  # unknown fields refused, no type coercion


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


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str  # a string, or a list of {"type": "text", "text": ...} parts (joined by newlines)

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


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

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
