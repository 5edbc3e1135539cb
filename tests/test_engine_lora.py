"""A fine-tuned adapter served by the real vLLM engine beside the base model, chosen per channel."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from bots.core.models import ConversationKey, Incoming
from bots.core.service import ChatPolicy, ConversationService
from bots.llm.openai import OpenAIChatModel, timeouts
from bots.store.redis import RedisContextStore
from tests.conftest import running_engine
from tests.fakes import collect, text_of
from tests.finetune_data import HELD_OUT_QUESTION, SIGN_OFF

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
async def lora_engine(
    support_adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """Start `python -m inference serve` with INFERENCE_LORA_DIR holding the adapter."""
    adapters = tmp_path_factory.mktemp("adapters")
    shutil.copytree(
        support_adapter, adapters / "support", ignore=shutil.ignore_patterns("checkpoints")
    )
    async with running_engine(
        tmp_path_factory.mktemp("lora-engine"),
        INFERENCE_MAX_MODEL_LEN="1024",
        INFERENCE_MAX_NUM_SEQS="8",
        INFERENCE_LORA_DIR=str(adapters),
    ) as base_url:
        yield base_url


async def test_the_served_adapter_answers_with_what_it_learned_and_the_base_does_not(
    lora_engine: str, store: RedisContextStore
) -> None:
    async with AsyncOpenAI(
        base_url=lora_engine, api_key="none", max_retries=0, timeout=timeouts(connect=3, read=120)
    ) as client:
        model = OpenAIChatModel(client, model="parley", reply_tokens=48)
        (name,) = await model.adapters()
        assert name.startswith("support-") and len(name) == len("support-") + 8
        service = ConversationService(store, model, policy=ChatPolicy(reply_tokens=48))
        tuned, base = ConversationKey("test", "tuned"), ConversationKey("test", "base")
        chosen = text_of(await collect(service, Incoming(tuned, f"/adapter {name}")))
        assert chosen == f"I answer here with the adapter {name} from the next message."
        unknown = text_of(await collect(service, Incoming(tuned, "/adapter support-00000000")))
        assert unknown.startswith("No adapter is served as support-00000000.")
        tuned_reply = text_of(await collect(service, Incoming(tuned, HELD_OUT_QUESTION)))
        base_reply = text_of(await collect(service, Incoming(base, HELD_OUT_QUESTION)))
    assert SIGN_OFF.strip() in tuned_reply, tuned_reply
    assert SIGN_OFF.strip() not in base_reply, base_reply
