"""Context fitting: exact budgets, and a prompt start that stays put between trims."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from bots.core.context import ByteRates, ContextFitter, bound_tokens
from bots.core.models import ConversationKey, Incoming, Notice, PromptMessage, Role, Turn
from bots.core.service import ChatPolicy, ConversationService
from tests.fakes import MemoryStore, ScriptedModel, collect

KEY = ConversationKey("test", "ctx")


class WordModel(ScriptedModel):
    """Replies with a fixed number of words, so every turn has a known size."""

    def reply(self, prompt: Sequence[PromptMessage]) -> str:
        return " ".join(["word"] * 20)


async def chat(turns: int, *, target: float, window: int = 400) -> tuple[WordModel, MemoryStore]:
    store, model = MemoryStore(), WordModel(window=window)
    policy = ChatPolicy(reply_tokens=50, trim_target=target, system_prompt="Be brief.")
    service = ConversationService(store, model, policy=policy)
    for index in range(turns):
        async for _ in service.respond(Incoming(KEY, f"question {index} " + "x " * 15)):
            pass
    return model, store


def history_of(prompt: list[PromptMessage]) -> list[PromptMessage]:
    return prompt[1:-1]


def trims(prompts: list[list[PromptMessage]]) -> int:
    """Count the turns whose prompt does not continue the previous one."""
    return sum(
        1
        for before, after in itertools.pairwise(prompts)
        if after[: len(before) - 1] != before[:-1]
    )


async def test_every_prompt_fits_and_the_start_moves_only_at_block_trims() -> None:
    model, _ = await chat(40, target=0.5)
    for prompt in model.prompts:
        assert await model.count_tokens(prompt) <= 400 - 50
    assert 2 <= trims(model.prompts) <= 8, "trimmed in a few blocks, not every turn"
    for prompt in model.prompts:
        assert prompt[0].role is Role.SYSTEM and prompt[1].role is Role.USER


async def test_a_sliding_window_moves_the_start_on_almost_every_turn() -> None:
    model, _ = await chat(40, target=1.0)
    assert trims(model.prompts) >= 25
    for prompt in model.prompts:
        assert await model.count_tokens(prompt) <= 400 - 50


async def test_after_a_trim_the_kept_history_is_the_newest_turns() -> None:
    model, store = await chat(30, target=0.5)
    last = model.prompts[-1]
    stored = [t.content for t in store.turns[KEY]]
    kept = [m.content for m in history_of(last)]
    assert kept == stored[len(stored) - len(kept) - 2 : -2], "a suffix of the history"
    assert store.windows[KEY] > 0


async def test_short_conversations_are_never_sent_to_the_tokenizer() -> None:
    model, _ = await chat(3, target=0.5, window=100_000)
    assert model.counted == 0


async def test_a_second_replica_builds_the_same_prompt_from_the_stored_window() -> None:
    model, store = await chat(25, target=0.5)
    other = WordModel(window=400)
    replica = ConversationService(
        store, other, policy=ChatPolicy(reply_tokens=50, trim_target=0.5, system_prompt="Be brief.")
    )
    mine = ConversationService(
        store, model, policy=ChatPolicy(reply_tokens=50, trim_target=0.5, system_prompt="Be brief.")
    )
    snapshot = (list(store.turns[KEY]), dict(store.windows))
    async for _ in replica.respond(Incoming(KEY, "next")):
        pass
    store.turns[KEY], store.windows = snapshot
    async for _ in mine.respond(Incoming(KEY, "next")):
        pass
    assert other.prompts[-1] == model.prompts[-1]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=120), min_size=0, max_size=30),
    new_size=st.integers(min_value=1, max_value=2000),
    target=st.floats(min_value=0.1, max_value=1.0),
    budget=st.integers(min_value=60, max_value=600),
)
def test_any_history_fits_any_budget(
    sizes: list[int], new_size: int, target: float, budget: int
) -> None:
    model = ScriptedModel()
    roles = [Role.USER, Role.ASSISTANT]
    history = [
        Turn(roles[index % 2], "w " * size, at=float(index)) for index, size in enumerate(sizes)
    ]
    new = Turn(Role.USER, "n " * new_size, at=float(len(sizes)))
    fitter = ContextFitter(model.count_tokens, target=target)
    fitted = asyncio.run(fitter.fit("sys", history, new, window_start=None, budget=budget))
    assert asyncio.run(model.count_tokens(fitted.messages)) <= budget
    last = fitted.messages[-1].content
    # The new message, alone (perhaps cut), or after the unanswered one it is read with.
    assert last.startswith("n ") or last.endswith("\n\n" + new.content)
    assert fitted.shortened == (new_size + 4 + 5 + 3 > budget)
    if len(fitted.messages) > 2:
        assert fitted.messages[1].role is Role.USER
    roles = [m.role for m in fitted.messages[1:]]
    assert roles == [Role.USER, Role.ASSISTANT] * (len(roles) // 2) + [Role.USER], "alternate"


async def test_a_system_prompt_too_long_for_the_context_is_cut_to_half_of_it() -> None:
    model = ScriptedModel()
    fitter = ContextFitter(model.count_tokens, target=0.5)
    new = Turn(Role.USER, "hello there", seq=1)
    fitted = await fitter.fit("persona " * 5000, [], new, window_start=None, budget=300)
    assert await model.count_tokens(fitted.messages[:1]) <= 150
    assert fitted.messages[-1].content == "hello there" and not fitted.shortened


@settings(max_examples=80, deadline=None)
@given(
    roles=st.lists(st.sampled_from([Role.USER, Role.ASSISTANT]), max_size=20),
    budget=st.integers(min_value=80, max_value=400),
)
def test_the_prompt_alternates_whatever_the_history_holds(roles: list[Role], budget: int) -> None:
    """Failed replies leave user, user; deleted questions leave assistant, assistant."""
    model = ScriptedModel()
    history = [Turn(role, f"t{i}", at=float(i), seq=i + 1) for i, role in enumerate(roles)]
    new = Turn(Role.USER, "now", at=99.0)
    fitter = ContextFitter(model.count_tokens, target=0.5)
    fitted = asyncio.run(fitter.fit("sys", history, new, window_start=None, budget=budget))
    after_system = [m.role for m in fitted.messages[1:]]
    assert after_system == [Role.USER, Role.ASSISTANT] * (len(after_system) // 2) + [Role.USER]
    assert fitted.messages[-1].content.endswith("now")


async def test_an_unanswered_message_is_read_with_the_next_and_an_orphan_answer_left_out() -> None:
    model = ScriptedModel()
    history = [
        Turn(Role.USER, "my name is Ada", seq=1),
        Turn(Role.ASSISTANT, "Hello Ada", seq=2),
        Turn(Role.ASSISTANT, "An answer to a deleted message", seq=4),
        Turn(Role.USER, "I like tea (its reply failed)", seq=5),
    ]
    new = Turn(Role.USER, "what do I like?", seq=6)
    fitter = ContextFitter(model.count_tokens, target=0.5)
    fitted = await fitter.fit("sys", history, new, window_start=None, budget=1000)
    assert [(m.role, m.content) for m in fitted.messages] == [
        (Role.SYSTEM, "sys"),
        (Role.USER, "my name is Ada"),
        (Role.ASSISTANT, "Hello Ada"),
        (Role.USER, "I like tea (its reply failed)\n\nwhat do I like?"),
    ]


def user(text: str) -> list[PromptMessage]:
    return [PromptMessage(Role.SYSTEM, "sys"), PromptMessage(Role.USER, text)]


def test_measured_rates_bound_only_cjk_text_and_never_past_the_bytes() -> None:
    rates = ByteRates()
    chinese, english = user("这是一条很长的消息" * 40), user("a long message " * 40)
    rates.observe(user("你好"), 12)  # too short to say anything
    rates.observe(english, 130)  # other text keeps the byte bound whatever it cost
    assert rates.bound(chinese) == bound_tokens(chinese)
    rates.observe(chinese, 370)  # 1 token a character, plus the template
    assert rates.bound(chinese) < 0.6 * bound_tokens(chinese)
    for other in (english, user("длинное сообщение " * 40), user("🙂" * 300), user("x1 " * 500)):
        assert rates.bound(other) == bound_tokens(other)
    rates.observe(chinese, 3 * 370)  # a model that needs 3 tokens a character
    assert rates.bound(chinese) == bound_tokens(chinese)
    rates.distrust()
    rates.observe(chinese, 1)
    assert rates.bound(chinese) == bound_tokens(chinese)


def shortened_text(parts: Sequence[object]) -> str:
    (said,) = [p.text for p in parts if isinstance(p, Notice)]
    return said


async def test_the_notice_says_how_many_characters_of_a_cut_message_were_read() -> None:
    model = ScriptedModel(window=1000)
    policy = ChatPolicy(reply_tokens=200, system_prompt="Be brief.")
    service = ConversationService(MemoryStore(), model, policy=policy)
    said = shortened_text(await collect(service, Incoming(KEY, "word " * 50_000)))
    read = len(model.prompts[0][-1].content) - len(" [...]")
    assert said == (
        "Your message is longer than I can read at once; "
        f"I read its first {read:,} of 250,000 characters."
    )
    assert 3_000 < read < 4_000


async def test_the_notice_says_where_a_message_over_the_character_cap_was_cut() -> None:
    policy = ChatPolicy(max_message_chars=100, system_prompt="Be brief.")
    service = ConversationService(MemoryStore(), ScriptedModel(), policy=policy)
    said = shortened_text(await collect(service, Incoming(KEY, "a" * 5_000)))
    assert said.endswith("I read its first 100 of 5,000 characters.")


async def test_the_figure_counts_the_user_s_text_not_the_author_s_name() -> None:
    model = ScriptedModel()
    fitter = ContextFitter(model.count_tokens, target=0.5)
    new = Turn(Role.USER, "w " * 1000, name="Ada", seq=1)
    fitted = await fitter.fit("sys", [], new, window_start=None, budget=300)
    kept = fitted.messages[-1].content.removeprefix("Ada: ").removesuffix(" [...]")
    assert fitted.shortened and fitted.read == len(kept)
