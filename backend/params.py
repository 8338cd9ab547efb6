"""The engine's plain data types, importable without torch: what a request asks for (SamplingParams),
how an engine is configured (EngineConfig), what requests are checked against (EngineLimits), and a
generated token's log-probabilities (TokenLogprobs). The serving side, the gateway and the Triton
model import these at the top of their modules; the engine's torch code imports them too.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from backend.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_BAD_WORDS = 16
# Below this temperature sampling is greedy: dividing logits by a smaller one (1e-40 is a float32
# denormal) overflows them to infinity, and softmax then has nothing to draw from.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0  # beyond it sampling is uniform over the kept tokens anyway
# Penalties that keep every logit finite: a seen logit is multiplied or divided by the penalty.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# OpenAI's range for presence_penalty and frequency_penalty (subtracted from seen tokens' logits).
OCCURRENCE_PENALTY_RANGE = (-2.0, 2.0)
MAX_LOGPROBS = 20  # most top alternatives per generated token (OpenAI's top_logprobs limit)
MAX_CHOICE_STRINGS = 1024  # structured_outputs.choice: each is an alternative of the grammar


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on what a request may generate: exactly one of a JSON schema (`json`, as JSON
    text), a regular expression, a list of strings (`choice`), a Lark grammar (llguidance's dialect)
    or any JSON object (`json_object`). vLLM's `structured_outputs` names and shape; compiled by
    backend/grammar.py. Checked here for shape only; the grammar library judges the content when the
    engine compiles it (an invalid one ends the request "invalid", naming the field)."""
    json: Optional[str] = None  # a JSON schema; a dict (or True/False) given here is stored as its JSON text
    regex: Optional[str] = None
    choice: Optional[tuple[str, ...]] = None
    grammar: Optional[str] = None
    json_object: bool = False
    disable_any_whitespace: bool = False  # JSON without whitespace between tokens (vLLM's option)
    disable_additional_properties: bool = False  # objects of the schema take no properties it does not name
    whitespace_pattern: Optional[str] = None  # JSON: a regex for the whitespace allowed between tokens

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        if self.json is not None and not isinstance(self.json, str):  # a schema object: canonical text, so
            object.__setattr__(self, "json", json.dumps(self.json))  # its key order is the output's
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [kind for kind in self.KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(f"'structured_outputs' needs exactly one of {', '.join(self.KINDS)}; "
                                      f"got {', '.join(given) or 'none'}")
        for name in ("regex", "grammar", "whitespace_pattern"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"'structured_outputs.{name}' must be a string")
        if self.json is not None:
            try:
                schema = json.loads(self.json)
            except ValueError as e:
                raise InvalidRequestError(f"'structured_outputs.json' is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError("'structured_outputs.json' must be a JSON schema (an object)")
        if self.choice is not None:
            if not self.choice or len(self.choice) > MAX_CHOICE_STRINGS:
                raise InvalidRequestError(f"'structured_outputs.choice' must hold 1 to {MAX_CHOICE_STRINGS} "
                                          f"strings, got {len(self.choice)}")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise InvalidRequestError("'structured_outputs.choice' must hold non-empty strings")

    @property
    def kind(self) -> str:
        """Which constraint this is: one of KINDS."""
        return next(kind for kind in self.KINDS if getattr(self, kind) not in (None, False))

    @classmethod
    def from_request(cls, obj: Mapping[str, Any]) -> "StructuredOutputs":
        """vLLM's `structured_outputs` object (or its older `guided_decoding`). Keys that only pick
        vLLM's backend are accepted and ignored: one library serves every constraint here."""
        if not isinstance(obj, Mapping):
            raise InvalidRequestError("'structured_outputs' must be an object")
        ours = {name for name in cls.__dataclass_fields__}
        ignored = {"backend", "disable_fallback"}
        unknown = sorted(set(obj) - ours - ignored)
        if "structural_tag" in unknown:
            raise InvalidRequestError("'structured_outputs.structural_tag' is not supported by this model")
        if unknown:
            raise InvalidRequestError(f"unknown key(s) {unknown} in 'structured_outputs'; known: {sorted(ours)}")
        return cls(**{key: value for key, value in obj.items() if key in ours})


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling parameters. The wire contract (gemma_protocol.SAMPLING_FIELDS) documents
    the same fields and defaults for clients (all but `bad_words_token_ids`, which the request side
    fills in); tests/test_sampling.py checks that the two agree."""
    max_tokens: Optional[int] = 16  # vLLM's default; None: as many as the context leaves room for (the front decides)
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 keeps all tokens; vLLM's -1 is accepted and stored as 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # None: none; k: the sampled token's logprob and the k most likely
    bad_words: tuple[str, ...] = ()  # never generated (vLLM's bad_words), as the token sequences below
    # Each bad word's token sequences, filled in by Engine.submit (where the tokenizer is), not
    # by clients: a sequence's last token is banned wherever the output so far ends with the rest.
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    structured_outputs: Optional[StructuredOutputs] = None  # a dict is read as vLLM's object
    # False: this request never speculates, even on an engine with speculative_config (its tokens are
    # the same either way; speculation only changes how many a step yields).
    speculate: bool = True

    def __post_init__(self) -> None:
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            object.__setattr__(self, "structured_outputs", StructuredOutputs.from_request(self.structured_outputs))
        # Lists are accepted but stored as tuples, so the params stay immutable and hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "bad_words", tuple(self.bad_words))
        object.__setattr__(self, "bad_words_token_ids", tuple(tuple(ids) for ids in self.bad_words_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        for ok, message in self._range_checks():
            if not ok:
                raise InvalidRequestError(message)

    def _range_checks(self) -> tuple[tuple[bool, str], ...]:
        return (
            (self.max_tokens is None or self.max_tokens >= 1, f"'max_tokens' must be >= 1, got {self.max_tokens}"),
            (0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
             f"'min_tokens' must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"),
            (0 <= self.temperature <= MAX_TEMPERATURE,  # also false for NaN
             f"'temperature' must be in [0, {MAX_TEMPERATURE:g}] (below {GREEDY_BELOW_TEMPERATURE:g}: greedy), "
             f"got {self.temperature}"),
            (self.top_k >= 0, f"'top_k' must be >= -1 (-1 or 0 keeps all tokens), got {self.top_k}"),
            (0 < self.top_p <= 1, f"'top_p' must be in (0, 1], got {self.top_p}"),
            (REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1],
             f"'repetition_penalty' must be in [{REPETITION_PENALTY_RANGE[0]:g}, {REPETITION_PENALTY_RANGE[1]:g}], "
             f"got {self.repetition_penalty}"),
            *((OCCURRENCE_PENALTY_RANGE[0] <= value <= OCCURRENCE_PENALTY_RANGE[1],
               f"'{name}' must be in [{OCCURRENCE_PENALTY_RANGE[0]:g}, {OCCURRENCE_PENALTY_RANGE[1]:g}], got {value}")
              for name, value in (("presence_penalty", self.presence_penalty),
                                  ("frequency_penalty", self.frequency_penalty))),
            (self.seed is None or 0 <= self.seed < 2**64, f"'seed' must be in [0, 2**64), got {self.seed}"),
            (len(self.stop) <= MAX_STOP_STRINGS,
             f"'stop' has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed"),
            (all(self.stop), "'stop' strings must be non-empty"),
            (all(t >= 0 for t in self.stop_token_ids), f"'stop_token_ids' must be >= 0, got {self.stop_token_ids}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"'logprobs' must be in [0, {MAX_LOGPROBS}] (or absent), got {self.logprobs}"),
            (len(self.bad_words) <= MAX_BAD_WORDS,
             f"'bad_words' has {len(self.bad_words)} strings; at most {MAX_BAD_WORDS} are allowed"),
            # A blank word has no tokens of its own (vLLM tokenizes words without leading spaces).
            (all(word.strip() for word in self.bad_words), "'bad_words' strings must not be empty or blank"),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1

    @functools.cached_property  # asked of every running request at every step (it writes __dict__: frozen is fine)
    def reads_token_history(self) -> bool:
        """Sampling reads the tokens so far (the repetition, presence or frequency penalty, or a bad word
        of several tokens; a one-token bad word is banned whatever came before)."""
        return (self.repetition_penalty != 1.0 or self.penalizes_occurrences
                or any(len(ids) > 1 for ids in self.bad_words_token_ids))

    @functools.cached_property  # asked of every sampling request at every step
    def samples_plainly(self) -> bool:
        """Greedy, with no penalty, no bad words and no logprobs: its token is the argmax of its raw
        logits, where EOS and its stop ids are -inf until min_tokens (backend.sampling.early_stops),
        and the sampler needs nothing else of it."""
        return (self.greedy and not self.reads_token_history and not self.bad_words_token_ids
                and self.logprobs is None)

    @property
    def penalizes_occurrences(self) -> bool:
        """OpenAI's presence or frequency penalty is set."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0



@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability and the most likely tokens' (best first), under the model's
    raw distribution: log_softmax of the fp32 logits, before min_tokens masking, bad words,
    penalties, temperature, top-k and top-p (vLLM's default, "raw_logprobs"). `rank` is the token's place in that
    distribution, vLLM's: 1 + the number of tokens more likely (the argmax is 1). The top tokens'
    ranks are their places in `top_ids`."""
    token_id: int
    logprob: float
    rank: int
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


DTYPES = ("float32", "bfloat16", "float16")
# The engine's torch device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
CHOICES = {
    "dtype": ("auto",) + DTYPES,  # auto: bfloat16 on CUDA, float32 on CPU
    "engine": ("auto", "te", "torch"),
    "fp8_recipe": ("delayed", "current", "block"),  # backend.te.model.make_fp8_recipe
    "async_scheduling": ("auto", "on", "off"),
}
AT_LEAST_ONE = ("kv_cache_bytes", "block_size", "max_num_seqs", "max_model_len", "max_num_batched_tokens")


@dataclass(frozen=True)
class EngineConfig:
    """How an engine is built; checked once, here, so a wrong value fails where it is written (a
    config.pbtxt parameter, a GEMMA_* variable, a CLI flag) rather than deep in the engine's start."""
    checkpoint: Optional[str] = None  # HF Gemma checkpoint dir; None: the packaged Gemma 3 270M (backend.loader)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU (matches the HF reference exactly)
    device: str = "auto"  # auto: cuda if available, else cpu
    engine: str = "auto"  # auto: TransformerEngine on CUDA when importable, else the torch reference
    kv_cache_bytes: int = 1 << 30
    # vLLM's gpu_memory_utilization: the fraction of the device's total memory (on the CPU, of the
    # host's or the container's) this engine may use, weights, activations and KV cache together;
    # the KV cache gets what the weights leave of it (backend/memory.py, utilization_budget), and
    # kv_cache_bytes is ignored. None: the KV cache is kv_cache_bytes.
    gpu_memory_utilization: Optional[float] = None
    block_size: int = 16
    max_num_seqs: int = 16  # sequences decoding together
    max_model_len: int = 8192  # prompt + generated tokens (capped by the model's positions)
    max_num_batched_tokens: int = 512  # tokens per step: bounds prefill chunks
    max_queue_size: int = 256  # waiting requests beyond this are refused (EngineOverloadedError)
    enable_prefix_caching: bool = True  # reuse the K/V of full blocks of earlier prompts and outputs
    fp8: bool = False  # TE only: FP8 GEMMs on Hopper
    fp8_recipe: str = "delayed"  # delayed | current | block (backend.te.model.make_fp8_recipe)
    fp8_lm_head: bool = False  # with fp8: the tied LM head in FP8 too (half its bytes per step, FP8 logits)
    cuda_graphs: bool = True  # GPU: decode steps (and the TE model's mixed steps) replay captured CUDA graphs
    async_scheduling: str = "auto"  # on: launch step N+1 before step N's tokens are back; auto: on for CUDA
    # An engine process whose steps stop returning (a hung kernel, a deadlock) for this long while
    # requests are in flight is killed, which ends them and lets the Triton model start a fresh one.
    # Far above any real step (a 512-token prefill chunk of the 270M takes ~2 s on 2 CPU cores).
    step_timeout_s: float = 60.0
    # A structured-outputs constraint that takes longer to compile ends its own request "invalid";
    # the others never wait for it (backend/grammar.py compiles beside the engine loop).
    grammar_compile_timeout_s: float = 10.0
    # Speculative decoding, as JSON text with vLLM's keys (SpeculativeConfig), e.g.
    # '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}' or
    # '{"method": "draft_model", "model": "/models/draft", "num_speculative_tokens": 3}';
    # None (or ""): off. A dict is stored as its JSON text.
    speculative_config: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.speculative_config, Mapping):
            object.__setattr__(self, "speculative_config", json.dumps(dict(self.speculative_config)))
        if self.speculative_config is not None and not self.speculative_config.strip():
            object.__setattr__(self, "speculative_config", None)
        self.speculative()  # raises ValueError naming what is wrong
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        for name in AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        for name in ("step_timeout_s", "grammar_compile_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1] (or unset), not {self.gpu_memory_utilization}")
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0, not {self.max_queue_size}")

    def queue_is_full(self, unfinished: int) -> bool:
        """Whether a request beside `unfinished` ones (running and waiting) is refused. Those not yet
        admitted count as waiting only beyond the free running slots: a burst that fits the batch is
        never refused."""
        return unfinished - self.max_num_seqs >= self.max_queue_size

    def queue_full_message(self) -> str:
        return f"{self.max_queue_size} requests are already waiting; retry later"

    def speculative(self) -> Optional["SpeculativeConfig"]:
        """`speculative_config` parsed; None when speculation is off."""
        return None if self.speculative_config is None else SpeculativeConfig.from_json(self.speculative_config)


MAX_SPECULATIVE_TOKENS = 16  # drafts verified per sequence and step (a verify chunk is 1 + this many tokens)
SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, with vLLM's `speculative_config` keys; the step verifies each speculating
    sequence's `num_speculative_tokens` drafts (backend/speculative.py).
    - `ngram` (prompt lookup): a sequence whose last n tokens (prompt_lookup_min <= n <=
      prompt_lookup_max, the longest found) occurred earlier in its prompt or output proposes the
      tokens that followed them there. As in vLLM, a lookup bound left out takes the other's value,
      and both left out are 5.
    - `draft_model`: `model`, the directory of a smaller checkpoint with the target's vocabulary,
      proposes them greedily (backend/draft_model.py; checked when the engine starts).
    As in vLLM, `method` left out is draft_model when a `model` is named; with neither it is ngram
    here (vLLM asks for one). `draft_tensor_parallel_size` may only be 1 (the draft runs on the
    target's device)."""
    method: Optional[str] = None
    num_speculative_tokens: int = 0
    model: Optional[str] = None
    prompt_lookup_min: Optional[int] = None
    prompt_lookup_max: Optional[int] = None
    draft_tensor_parallel_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.method is None:
            object.__setattr__(self, "method", "draft_model" if self.model is not None else "ngram")
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config: method {self.method!r} is not supported; supported: "
                             f"{', '.join(SPECULATIVE_METHODS)}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "draft_tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"speculative_config: {name} must be an integer, not {value!r}")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config: num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                             f"not {self.num_speculative_tokens}")
        if self.draft_tensor_parallel_size not in (None, 1):
            raise ValueError(f"speculative_config: draft_tensor_parallel_size must be 1 (the draft runs on the "
                             f"target's device), not {self.draft_tensor_parallel_size}")
        if self.method == "draft_model":
            self._check_draft_model()
        else:
            self._check_ngram()

    def _check_draft_model(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"speculative_config: method draft_model needs `model`, the draft checkpoint's "
                             f"directory, not {self.model!r}")
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            if getattr(self, name) is not None:
                raise ValueError(f"speculative_config: {name} is for method ngram, not draft_model")

    def _check_ngram(self) -> None:
        if self.model is not None:
            raise ValueError("speculative_config: `model` names a draft model: use method draft_model, not ngram")
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        low, high = (5, 5) if low is None and high is None else (high, high) if low is None else \
            (low, low) if high is None else (low, high)
        object.__setattr__(self, "prompt_lookup_min", low)
        object.__setattr__(self, "prompt_lookup_max", high)
        if not 1 <= low <= high:
            raise ValueError(f"speculative_config: needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{low} and {high}")

    @classmethod
    def from_json(cls, text: str) -> "SpeculativeConfig":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"speculative_config must be a JSON object, not {text!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: {sorted(known)}")
        if "num_speculative_tokens" not in obj:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        return cls(**obj)


@dataclass(frozen=True)
class EngineLimits:
    """What a request is checked against; known once the engine has its model and cache."""
    vocab_size: int
    max_model_len: int  # prompt + generated tokens
    num_blocks: int  # KV cache blocks
    block_size: int


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)
