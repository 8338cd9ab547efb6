"""The Gemma chat format and the conversation bookkeeping (no server needed)."""
from __future__ import annotations

import pytest

from gemma_client import Conversation, Turn
from gemma_client.chat import _strip_end_of_turn, _with_end_of_turn


def test_single_user_turn():
    chat = Conversation(turns=[Turn("user", "Hello!")])
    assert chat.render() == "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n"


def test_system_is_prepended_to_first_user_turn_only():
    chat = Conversation(system="Be brief.")
    chat.add_user("Hi")
    chat.add_model("Hello.")
    chat.add_user("  Why is the sky blue?\n")
    assert chat.render() == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n"
        "<start_of_turn>model\n")
    assert "<bos>" not in chat.render()  # the server's tokenizer adds it


def test_turns_must_alternate():
    chat = Conversation()
    with pytest.raises(ValueError):
        chat.add_model("I speak first")
    chat.add_user("Hi")
    with pytest.raises(ValueError):
        chat.add_user("Hi again")
    with pytest.raises(ValueError):
        chat.send(None, "a third message before the reply")


def test_generation_prompt_needs_a_user_turn():
    with pytest.raises(ValueError):
        Conversation().render()
    assert Conversation().render(add_generation_prompt=False) == ""


def test_end_of_turn_is_always_a_stop_string():
    assert _with_end_of_turn({})["stop"] == ["<end_of_turn>"]
    assert _with_end_of_turn({"stop": ["\n\n"], "max_tokens": 3}) == \
        {"stop": ["\n\n", "<end_of_turn>"], "max_tokens": 3}
    assert _with_end_of_turn({"stop": ["<end_of_turn>"]})["stop"] == ["<end_of_turn>"]
    assert _strip_end_of_turn(" Hi there.<end_of_turn>\n") == "Hi there."
