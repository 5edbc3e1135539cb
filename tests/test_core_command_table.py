"""The command table: how arguments choose an action, who may run it, what /help shows."""

from __future__ import annotations

import pytest

from bots.core.commands import (
    COMMANDS,
    HELP_TEXT,
    Action,
    Call,
    CommandSpec,
    Shared,
    find_command,
    help_text,
)
from bots.core.models import Author, ConversationKey, Incoming
from bots.core.service import ChatPolicy, ConversationService
from tests.fakes import MemoryStore, ScriptedModel, collect, text_of

KEY = ConversationKey("test", "room")


async def _echo(call: Call) -> str:
    return f"{call.word}|{call.text}"


TABLE = CommandSpec(
    "demo",
    "A demo",
    "shows how actions are chosen",
    (
        Action("", _echo),
        Action("set", _echo, admins=Shared.CHANNEL, refusal="admins set"),
        Action(None, _echo, admins=Shared.CONVERSATION, refusal="admins choose"),
    ),
)


@pytest.mark.parametrize(
    ("args", "word", "text"),
    [
        ("", "", ""),
        ("set two words", "set", "two words"),
        ("SET\nx", "set", "x"),
        ("x y", "", "x y"),
    ],
)
def test_the_first_word_chooses_the_action_and_the_rest_is_its_text(
    args: str, word: str, text: str
) -> None:
    chosen = TABLE.action_for(args)
    assert chosen is not None and chosen[1:] == (word, text)


def test_arguments_no_action_takes_get_the_usage_or_the_plain_action() -> None:
    strict = CommandSpec("s", "s", "s", (Action("", _echo), Action("on", _echo)), usage="Use /s on")
    assert strict.action_for("maybe") is None
    loose = CommandSpec("l", "l", "l", (Action("", _echo),))
    chosen = loose.action_for("now please")
    assert chosen is not None and chosen[0].word == "" and chosen[2] == "now please"


@pytest.mark.parametrize(
    ("shared", "in_group", "is_admin", "own", "refused"),
    [
        (Shared.CHANNEL, False, False, False, False),  # a private chat: everyone is an admin
        (Shared.CHANNEL, True, False, False, True),
        (Shared.CHANNEL, True, False, True, True),  # a channel option is shared by all
        (Shared.CHANNEL, True, True, False, False),
        (Shared.CONVERSATION, True, False, False, True),
        (Shared.CONVERSATION, True, False, True, False),  # a member's own conversation
    ],
)
def test_who_may_run_an_action(
    shared: Shared, in_group: bool, is_admin: bool, own: bool, refused: bool
) -> None:
    action = Action("x", _echo, admins=shared, refusal="no")
    key = ConversationKey("test", "room", user="1" if own else None)
    incoming = Incoming(key, "/x", in_group=in_group, is_admin=is_admin)
    assert action.refuses(incoming, key) is refused


def test_help_has_a_line_per_command_of_the_table() -> None:
    lines = HELP_TEXT.splitlines()[1:]
    assert [line.split()[0] for line in lines] == [f"/{spec.name}" for spec in COMMANDS]
    assert help_text((TABLE,)).splitlines()[1] == "/demo     shows how actions are chosen"


def test_every_command_is_found_by_name_and_every_guarded_action_says_why() -> None:
    for spec in COMMANDS:
        assert find_command(spec.name) is spec
        assert spec.asks_model or spec.actions, f"/{spec.name} does something"
        for action in spec.actions:
            assert action.admins is None or action.refusal, f"/{spec.name} {action.word}"
    assert find_command("frobnicate") is None


def test_only_commands_on_the_turns_wait_in_line_and_only_reset_ends_a_reply() -> None:
    waiting = [spec.name for spec in COMMANDS if spec.waits_in_line]
    assert waiting == ["reset", "retry"], "the others read or set the channel's options"
    assert [spec.name for spec in COMMANDS if spec.ends_reply] == ["reset"]


async def test_an_edited_message_is_cut_like_a_new_one() -> None:
    store = MemoryStore()
    service = ConversationService(store, ScriptedModel(), policy=ChatPolicy(max_message_chars=10))
    ada = Author("1", "Ada")
    await collect(service, Incoming(KEY, "short", author=ada, message_id="m1"))
    assert await service.edit(Incoming(KEY, "x" * 50, author=ada, message_id="m1"))
    (user, _) = store.turns[KEY]
    assert user.content.startswith("x" * 10) and not user.content.startswith("x" * 11)
    assert len(user.content) < 50


async def test_a_command_of_the_table_answers_through_the_service() -> None:
    service = ConversationService(MemoryStore(), ScriptedModel())
    parts = await collect(service, Incoming(KEY, "/collect maybe", author=Author("1", "Ada")))
    assert text_of(parts) == find_command("collect").usage  # type: ignore[union-attr]
