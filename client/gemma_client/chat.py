"""Multi-turn chat in the Gemma chat format.

    <start_of_turn>user
    {system}\n\n{first user message}<end_of_turn>
    <start_of_turn>model
    {reply}<end_of_turn>
    <start_of_turn>user
    ...<end_of_turn>
    <start_of_turn>model

Gemma has no system role: a system message is prepended to the first user turn (as the official
chat template does). `<bos>` is not written: the server's tokenizer adds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, List, Optional

from .outputs import Delta

if TYPE_CHECKING:
    from .aio import AsyncGemmaClient
    from .client import GemmaClient

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
USER, MODEL = "user", "model"


@dataclass
class Turn:
    role: str  # "user" or "model"
    text: str


class Conversation:
    """The turns of one chat, rendered as a Gemma prompt.

    >>> chat = Conversation(system="Answer in one sentence.")
    >>> for delta in chat.send(client, "Why is the sky blue?", max_tokens=64):
    ...     print(delta.text, end="")
    >>> chat.turns[-1]   # Turn(role="model", text="...")

    `send` stops generation at `<end_of_turn>` (added to `stop`). The user turn and the reply are
    recorded once the reply has been read; if the request fails before any text arrived, nothing is
    recorded (so the same message can be sent again); a reply cut short (a `break`, an error) is
    recorded as far as it got.
    """

    def __init__(self, system: Optional[str] = None, turns: Optional[List[Turn]] = None):
        self.system = system
        self.turns: List[Turn] = list(turns or [])

    def add_user(self, text: str) -> None:
        self._append(Turn(USER, text))

    def add_model(self, text: str) -> None:
        self._append(Turn(MODEL, text))

    def reset(self) -> None:
        """Forget the turns (the system message stays)."""
        self.turns.clear()

    def render(self, add_generation_prompt: bool = True) -> str:
        """The prompt text; with `add_generation_prompt`, ending in an open model turn."""
        parts = []
        for i, turn in enumerate(self.turns):
            prefix = self.system + "\n\n" if i == 0 and self.system else ""
            parts.append(f"{START_OF_TURN}{turn.role}\n{prefix}{turn.text.strip()}{END_OF_TURN}\n")
        if add_generation_prompt:
            if not self.turns or self.turns[-1].role != USER:
                raise ValueError("a generation prompt needs the last turn to be the user's")
            parts.append(f"{START_OF_TURN}{MODEL}\n")
        return "".join(parts)

    def send(self, client: "GemmaClient", text: str, **sampling: Any) -> Iterator[Delta]:
        """Send a user message; stream the reply's deltas and record both turns."""
        prompt = self._prompt_with(text)
        deltas = client.stream(prompt, **_with_end_of_turn(sampling))  # checks arguments now
        return self._record(text, deltas)

    def send_async(self, client: "AsyncGemmaClient", text: str, **sampling: Any) -> AsyncIterator[Delta]:
        """`send` for `AsyncGemmaClient`: `async for delta in chat.send_async(client, text)`."""
        prompt = self._prompt_with(text)
        deltas = client.stream(prompt, **_with_end_of_turn(sampling))
        return self._record_async(text, deltas)

    # -- internals ---------------------------------------------------------------------------

    def _append(self, turn: Turn) -> None:
        expected = USER if not self.turns or self.turns[-1].role == MODEL else MODEL
        if turn.role != expected:
            raise ValueError(f"turns must alternate user/model; expected a {expected} turn")
        self.turns.append(turn)

    def _prompt_with(self, text: str) -> str:
        if self.turns and self.turns[-1].role != MODEL:
            raise ValueError("the previous user turn has no reply yet")
        return Conversation(self.system, self.turns + [Turn(USER, text)]).render()

    def _finish(self, text: str, reply: List[str]) -> None:
        if reply:
            self.turns += [Turn(USER, text), Turn(MODEL, _strip_end_of_turn("".join(reply)))]

    def _record(self, text: str, deltas: Iterator[Delta]) -> Iterator[Delta]:
        reply: List[str] = []
        try:
            for delta in deltas:
                reply.append(delta.text)
                yield delta
        finally:
            deltas.close()
            self._finish(text, reply)

    async def _record_async(self, text: str, deltas) -> AsyncIterator[Delta]:
        reply: List[str] = []
        try:
            async for delta in deltas:
                reply.append(delta.text)
                yield delta
        finally:
            await deltas.aclose()
            self._finish(text, reply)


def _with_end_of_turn(sampling: dict) -> dict:
    stop = sampling.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if END_OF_TURN not in stop:
        stop = [*stop, END_OF_TURN]
    return {**sampling, "stop": stop}


def _strip_end_of_turn(text: str) -> str:
    cut = text.find(END_OF_TURN)
    return (text if cut < 0 else text[:cut]).strip()
