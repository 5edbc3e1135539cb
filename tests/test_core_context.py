"""Context fitting: exact budgets, and a prompt start that stays put between trims."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from bots.core.context import ContextFitter
from bots.core.models import ConversationKey, Incoming, PromptMessage, Role, Turn
from bots.core.service import ChatPolicy, ConversationService
from tests.fakes import MemoryStore, ScriptedModel

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
    assert fitted.messages[-1].content.startswith("n ")
    assert fitted.shortened == (new_size + 4 + 5 + 3 > budget)
    if len(fitted.messages) > 2:
        assert fitted.messages[1].role is Role.USER


async def test_a_system_prompt_too_long_for_the_context_is_cut_to_half_of_it() -> None:
    model = ScriptedModel()
    fitter = ContextFitter(model.count_tokens, target=0.5)
    new = Turn(Role.USER, "hello there", seq=1)
    fitted = await fitter.fit("persona " * 5000, [], new, window_start=None, budget=300)
    assert await model.count_tokens(fitted.messages[:1]) <= 150
    assert fitted.messages[-1].content == "hello there" and not fitted.shortened
