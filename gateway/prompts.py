"""Request -> prompt text: completions take the prompt as is; chat messages become Gemma turns.

Gemma has no system role: a leading system (or developer) message is written at the head of the
first user turn, as Gemma's chat template does (gemma_client.chat.Conversation renders the turns,
the same renderer the client's chat uses), followed by the tools' instructions when the request has
tools (tools.py). Tool calls and tool results in the history are written in the same format
(tools.render_calls, tools.render_result): the results as user turns, since Gemma's turns alternate
user/model. `<bos>` is not written: the server's tokenizer adds it.
"""
from __future__ import annotations

from typing import Optional

from gemma_client.chat import END_OF_TURN, MODEL, USER, Conversation

from .errors import invalid_request
from .schemas import ChatMessage
from .tools import render_calls, render_result

SYSTEM_ROLES = ("system", "developer")
# Generation ends at the end of the model's turn (an EOS id for Gemma chat checkpoints; a stop string
# for those whose generation config lacks it).
CHAT_STOP = (END_OF_TURN,)


def chat_prompt(messages: list[ChatMessage], tool_instructions: Optional[str] = None) -> str:
    has_system = messages[0].role in SYSTEM_ROLES
    system = "\n\n".join(part for part in (messages[0].content if has_system else None, tool_instructions)
                         if part) or None
    conversation = Conversation(system)
    called: dict[str, str] = {}  # tool call id -> the function's name
    turn_text, turn_role, turn_start, after_tool = "", None, 0, False
    for i in range(1 if has_system else 0, len(messages)):
        message = messages[i]
        if message.role in SYSTEM_ROLES:
            raise invalid_request("a system message may only come first (Gemma has no system role)",
                                  param=f"messages[{i}].role")
        if message.role == "tool":
            name = called.get(message.tool_call_id)
            if name is None:
                raise invalid_request("a tool message must answer a tool call of an earlier assistant message "
                                      f"(no call has the id {message.tool_call_id!r})",
                                      param=f"messages[{i}].tool_call_id")
            role, text = USER, render_result(name, message.content)
        elif message.role == "assistant":
            role = MODEL
            text = render_calls(message.content, message.tool_calls) if message.tool_calls else message.content
            called.update((call.id, call.function.name) for call in message.tool_calls or ())
        else:
            role, text = USER, message.content
        if after_tool and role == USER:  # tool results, and a user message after them, share a turn
            turn_text += "\n\n" + text
        else:
            if turn_role is not None:
                _add(conversation, turn_role, turn_text, turn_start)
            turn_text, turn_role, turn_start = text, role, i
        after_tool = message.role == "tool"
    if turn_role is not None:
        _add(conversation, turn_role, turn_text, turn_start)
    if not conversation.turns or conversation.turns[-1].role != USER:
        raise invalid_request("the last message must be the user's (or a tool's)", param="messages")
    return conversation.render()


def _add(conversation: Conversation, role: str, text: str, index: int) -> None:
    try:
        (conversation.add_user if role == USER else conversation.add_model)(text)
    except ValueError:
        raise invalid_request("roles must alternate user/assistant, starting with user "
                              "(after an optional system message; tool messages answer an assistant's "
                              "tool calls)", param=f"messages[{index}].role") from None
