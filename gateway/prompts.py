"""Request -> prompt text: completions take the prompt as is; chat messages become Gemma turns.

Gemma has no system role: a leading system (or developer) message is written at the head of the
first user turn, as Gemma's chat template does (gemma_client.chat.Conversation renders the turns,
the same renderer the client's chat uses). `<bos>` is not written: the server's tokenizer adds it.
"""
from __future__ import annotations

from gemma_client.chat import END_OF_TURN, USER, Conversation

from .errors import invalid_request
from .schemas import ChatMessage

SYSTEM_ROLES = ("system", "developer")
# Generation ends at the end of the model's turn (an EOS id for Gemma chat checkpoints; a stop string
# for those whose generation config lacks it).
CHAT_STOP = (END_OF_TURN,)


def chat_prompt(messages: list[ChatMessage]) -> str:
    system = messages[0].content if messages[0].role in SYSTEM_ROLES else None
    conversation = Conversation(system)
    for i in range(1 if system is not None else 0, len(messages)):
        message = messages[i]
        if message.role in SYSTEM_ROLES:
            raise invalid_request("a system message may only come first (Gemma has no system role)",
                                  param=f"messages[{i}].role")
        try:
            (conversation.add_user if message.role == USER else conversation.add_model)(message.content)
        except ValueError:
            raise invalid_request("roles must alternate user/assistant, starting with user "
                                  "(after an optional system message)", param=f"messages[{i}].role") from None
    if not conversation.turns or conversation.turns[-1].role != USER:
        raise invalid_request("the last message must be the user's", param="messages")
    return conversation.render()
