"""Tool calling for Gemma 3, which has no tool format of its own: the tools in the prompt, the
constraint a `tool_choice` asks for, and parsers that turn the model's text into OpenAI tool calls.

tool_choice (docs/gateway.md, Tools, has the prompts in full):
- "none": the tools are left out of the prompt; plain text.
- "auto" (the default with tools): the tools and an instruction go into the prompt (before the first
  user message, as a system message is); the model answers in text, or with a ```tool_call fenced
  block holding one JSON object {"name", "arguments"} per line. Nothing constrains it; `AutoParser`
  streams the text before the block as content and reads the block's calls at the end. A block that
  does not parse (bad JSON, an unknown name) is content, as is every answer without a block.
- "required": the output is constrained to a JSON array of {"name", "parameters"}, an anyOf over the
  tools (at most one item with parallel_tool_calls false); each item is a call.
- {"type": "function", "function": {"name"}}: constrained to that function's parameters schema; the
  output is its arguments.

Conversation history: an assistant message with tool_calls is a model turn holding the same
```tool_call block (after its content, if any); a tool message is a user turn holding a
```tool_result block named after the function it answers. Consecutive tool messages, and a user
message right after them, share one user turn (Gemma's turns alternate).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from .schemas import ChatCompletionRequest, NamedToolChoice, Tool, ToolCall
from .structured import json_constraint

CALL_FENCE = "```tool_call"
RESULT_FENCE = "```tool_result"
FENCE_END = "```"
NO_PARAMETERS = {"type": "object", "properties": {}}


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# --- What the parsers hand the response: content text, and tool calls in pieces ---------------------

@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int  # the call's index in the choice's tool_calls
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str  # a fragment of the arguments' JSON text


Piece = Union[Content, CallStart, CallArguments]


class Parser:
    """Reads one choice's text as it arrives. `feed` returns what can be sent now; `end` the rest."""
    calls = 0  # tool calls started so far

    def feed(self, text: str) -> list[Piece]:
        raise NotImplementedError

    def end(self) -> list[Piece]:
        return []


# --- tool_choice: what each asks of the prompt, the engine and the parser -----------------------------

@dataclass(frozen=True)
class ToolPlan:
    mode: str                 # "auto", "required" or "named"
    tools: tuple[Tool, ...]   # those the prompt shows (named: the one)
    parallel: bool            # more than one call allowed (parallel_tool_calls)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(tool.function.name for tool in self.tools)

    def instructions(self) -> str:
        """The tools and what to do with them, written where a system message goes."""
        listing = "\n".join(json.dumps(_definition(tool), ensure_ascii=False) for tool in self.tools)
        if self.mode == "named":
            return (f"You can call this function (a tool). It is given as JSON: its name, what it does, "
                    f"and a JSON schema of its arguments.\n{listing}\n\n"
                    f"Call {self.names[0]}: reply with its arguments as a JSON object.")
        head = ("You can call these functions (tools). Each is given as JSON: its name, what it does, "
                f"and a JSON schema of its arguments.\n{listing}\n\n")
        if self.mode == "required":
            many = "one or more calls" if self.parallel else "exactly one call"
            return head + (f"Reply with {many} as a JSON array: "
                           '[{"name": "<function name>", "parameters": {<its arguments>}}]')
        what = "one line per call" if self.parallel else "one call at most"
        return head + (f"To call functions, reply with only this block ({what}):\n"
                       f"{CALL_FENCE}\n"
                       '{"name": "<function name>", "arguments": {<its arguments as JSON>}}\n'
                       f"{FENCE_END}\n"
                       "If no function is needed, reply to the user in plain text.")

    def constraint(self) -> Optional[dict[str, Any]]:
        """The `structured_outputs` the engine applies (auto: none)."""
        if self.mode == "named":
            return json_constraint(_parameters(self.tools[0]))
        if self.mode == "required":
            calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                                       "parameters": _parameters(tool)},
                      "required": ["name", "parameters"], "additionalProperties": False} for tool in self.tools]
            array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if not self.parallel:
                array["maxItems"] = 1
            return json_constraint(array)
        return None

    def parser(self) -> Parser:
        if self.mode == "named":
            return NamedParser(self.names[0])
        if self.mode == "required":
            return ArrayParser()
        return AutoParser(self.names, self.parallel)


def tool_plan(request: ChatCompletionRequest) -> Optional[ToolPlan]:
    """What the request's tools ask for; None: plain text (no tools, or tool_choice "none")."""
    choice = request.tool_choice or "auto"
    if not request.tools or choice == "none":
        return None
    parallel = request.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        (tool,) = [t for t in request.tools if t.function.name == choice.function.name]
        return ToolPlan("named", (tool,), parallel=False)
    return ToolPlan(choice, tuple(request.tools), parallel)


def _definition(tool: Tool) -> dict[str, Any]:
    function = tool.function
    definition: dict[str, Any] = {"name": function.name}
    if function.description:
        definition["description"] = function.description
    definition["parameters"] = _parameters(tool)
    return definition


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else NO_PARAMETERS


# --- Conversation history: calls and results as Gemma turn text ---------------------------------------

def render_calls(content: Optional[str], calls: Sequence[ToolCall]) -> str:
    """An assistant message's tool calls, as the auto format writes them."""
    lines = [json.dumps({"name": call.function.name, "arguments": _arguments_value(call.function.arguments)},
                        ensure_ascii=False) for call in calls]
    block = "\n".join([CALL_FENCE, *lines, FENCE_END])
    return f"{content.strip()}\n{block}" if content and content.strip() else block


def render_result(name: str, content: str) -> str:
    return f"{RESULT_FENCE} {name}\n{content.strip()}\n{FENCE_END}"


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # not JSON: shown as the string it is


# --- Parsers ---------------------------------------------------------------------------------------

class NamedParser(Parser):
    """A named function's constrained output: all of it is the one call's arguments."""

    def __init__(self, name: str):
        self._name = name

    def feed(self, text: str) -> list[Piece]:
        pieces: list[Piece] = []
        if not self.calls:
            self.calls = 1
            pieces.append(CallStart(0, self._name))
        if text:
            pieces.append(CallArguments(0, text))
        return pieces


class ArrayParser(Parser):
    """tool_choice "required": the output is a JSON array of {"name": ..., "parameters": {...}},
    read a character at a time so that each call starts once its name has arrived and its arguments
    stream as they are generated. The constraint guarantees the shape; the scanner only tracks
    nesting, strings and which key of an item it is in (either key order works: arguments that come
    before the name wait for it)."""

    def __init__(self) -> None:
        self._depth = 0           # open arrays and objects
        self._in_string = self._escape = False
        self._raw: Optional[list[str]] = None  # an item-level string being read (a key or the name)
        self._key: Optional[str] = None        # the item's current key
        self._expect_value = False
        self._in_arguments = self._arguments_seen = False
        self._index = -1
        self._name: Optional[str] = None
        self._waiting: list[str] = []          # arguments read before the name
        self._pieces: list[Piece] = []

    def feed(self, text: str) -> list[Piece]:
        for ch in text:
            self._char(ch)
        pieces, self._pieces = _merged(self._pieces), []
        return pieces

    def _char(self, ch: str) -> None:
        if self._in_string:
            if self._in_arguments:
                self._argument(ch)
            elif self._raw is not None:
                self._raw.append(ch)
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self._in_arguments and self._depth == 2:  # the arguments were a string
                    self._in_arguments = False
                elif self._raw is not None:
                    self._item_string(json.loads("".join(self._raw)))
                    self._raw = None
            return
        item_level = self._depth == 2
        if self._in_arguments and item_level and ch in ",}":  # the end of a number or literal
            self._in_arguments = False
        if (item_level and self._expect_value and self._key == "parameters" and not self._arguments_seen
                and not ch.isspace() and ch not in ",}"):
            self._in_arguments = self._arguments_seen = True
        if self._in_arguments:
            self._argument(ch)
        if ch == '"':
            self._in_string = True
            if item_level and not self._in_arguments:
                self._raw = [ch]
        elif ch in "[{":
            self._depth += 1
            if self._depth == 2:
                self._new_item()
        elif ch in "]}":
            self._depth -= 1
            if self._in_arguments and self._depth == 2:
                self._in_arguments = False
        elif item_level and ch == ":":
            self._expect_value = True
        elif item_level and ch == ",":
            self._expect_value, self._key = False, None

    def _new_item(self) -> None:
        self._key, self._expect_value = None, False
        self._in_arguments = self._arguments_seen = False
        self._name, self._waiting = None, []

    def _item_string(self, value: Any) -> None:
        if not self._expect_value:
            self._key = value
        elif self._key == "name" and self._name is None and isinstance(value, str):
            self._name = value
            self._index += 1
            self.calls += 1
            self._pieces.append(CallStart(self._index, value))
            if self._waiting:
                self._pieces.append(CallArguments(self._index, "".join(self._waiting)))
                self._waiting = []

    def _argument(self, ch: str) -> None:
        if self._name is None:
            self._waiting.append(ch)
        else:
            self._pieces.append(CallArguments(self._index, ch))


class AutoParser(Parser):
    """tool_choice "auto": text is content until a ```tool_call fence; from the fence on the text is
    held, and at the end its blocks are read as calls (or, if they do not parse, sent as content).
    Text that could be the start of the fence is held back until it is clear that it is not; so is
    leading whitespace (an answer that is only a call then has no content at all)."""

    def __init__(self, names: Sequence[str], parallel: bool):
        self._names = set(names)
        self._parallel = parallel
        self._pending = ""                 # content not sent yet
        self._block: Optional[str] = None  # the text from the fence on
        self._sent_any = False

    def feed(self, text: str) -> list[Piece]:
        if self._block is not None:
            self._block += text
            return []
        self._pending += text
        fence = self._pending.find(CALL_FENCE)
        if fence >= 0:
            self._pending, self._block = self._pending[:fence], self._pending[fence:]
            return self._send()
        return self._send(keep=_partial_fence(self._pending))

    def end(self) -> list[Piece]:
        calls = None if self._block is None else parse_calls(self._block, self._names)
        if calls is None:  # no block, or not calls after all: everything is content
            self._pending += self._block or ""
            return self._send(final=True)
        calls = calls if self._parallel else calls[:1]
        self.calls = len(calls)
        return [piece for index, (name, arguments) in enumerate(calls)
                for piece in (CallStart(index, name), CallArguments(index, arguments))]

    def _send(self, keep: int = 0, final: bool = False) -> list[Piece]:
        """Content: what is pending but its last `keep` characters (and, before any content has
        been sent, unless `final`, nothing that is only whitespace)."""
        ready = self._pending[:len(self._pending) - keep]
        if not ready or (not final and not self._sent_any and not ready.strip()):
            return []
        self._pending = self._pending[len(ready):]
        self._sent_any = True
        return [Content(ready)]


def _partial_fence(text: str) -> int:
    """How many characters at the end of `text` could begin the fence."""
    for size in range(min(len(text), len(CALL_FENCE) - 1), 0, -1):
        if CALL_FENCE.startswith(text[-size:]):
            return size
    return 0


_BLOCK = re.compile(re.escape(CALL_FENCE) + r"[ \t]*\n?(.*?)(?:" + re.escape(FENCE_END) + r"|$)", re.DOTALL)


def parse_calls(text: str, names: set[str]) -> Optional[list[tuple[str, str]]]:
    """The (name, arguments JSON text) of each call in the ```tool_call blocks of `text`; None if a
    block is not calls of known functions. A block holds one JSON object per line, or one object, or
    a JSON array of them; each {"name", "arguments"} ("parameters" is read as "arguments"), the
    arguments an object (or a string holding one). A block the output ended inside counts if what
    it holds parses."""
    calls: list[tuple[str, str]] = []
    for block in _BLOCK.findall(text):
        items = _block_items(block.strip())
        if not items:
            return None
        for item in items:
            call = _call(item, names)
            if call is None:
                return None
            calls.append(call)
    return calls or None


def _block_items(block: str) -> Optional[list[Any]]:
    try:
        whole = json.loads(block)
        return whole if isinstance(whole, list) else [whole]
    except ValueError:
        pass
    try:
        return [json.loads(line) for line in block.splitlines() if line.strip()]
    except ValueError:
        return None


def _call(item: Any, names: set[str]) -> Optional[tuple[str, str]]:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return item["name"], json.dumps(arguments, ensure_ascii=False)


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent argument fragments of one call as one."""
    out: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, CallArguments) and out and isinstance(out[-1], CallArguments) \
                and out[-1].index == piece.index:
            out[-1] = CallArguments(piece.index, out[-1].text + piece.text)
        else:
            out.append(piece)
    return out
