"""The knowledge base with its real parts: vLLM serving the bundled embedding model, Redis 8,
the `python -m bots kb` process, and answers through the chat engine on every platform."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fpdf import FPDF
from openai import AsyncOpenAI
from redis.asyncio import Redis

from bots.core.handoff import OFFER
from bots.core.knowledge import RetrievalPolicy, Retriever
from bots.core.models import Hit
from bots.core.service import ChatPolicy, ConversationService
from bots.delivery.inflight import InFlight
from bots.knowledge.ingest import Ingest, IngestOptions
from bots.llm.embeddings import OpenAIEmbedder
from bots.llm.openai import OpenAIChatModel, timeouts
from bots.platforms.discord import run_discord
from bots.settings import DiscordSettings
from bots.store.knowledge import RedisKnowledge
from bots.store.redis import RedisContextStore
from tests.conftest import ENGINE_API_KEY, free_port
from tests.cut_proxy import CutProxy
from tests.fake_discord import DM_CHANNEL_ID as DM
from tests.fake_discord import SNOWFLAKE, FakeDiscord, user
from tests.fake_telegram import person
from tests.http_channel import read_events
from tests.knowledge_set import DOCS, Question, evaluate, questions
from tests.telegram_run import running_telegram
from tests.test_http_process import bots, http_process

pytestmark = pytest.mark.engine

EMBED_MODEL = "parley-embed"
BASE_URL = "https://help.lumen.example/"
THRESHOLD = RetrievalPolicy().threshold


@dataclass
class Corpus:
    prefix: str
    index: RedisKnowledge
    embedder: OpenAIEmbedder
    retriever: Retriever


@pytest.fixture(scope="module")
async def corpus(embedding_engine: str, redis_url: str) -> AsyncIterator[Corpus]:
    """The help centre, ingested once through the real embedding engine into Redis 8."""
    prefix = f"kb-{uuid.uuid4().hex[:8]}"
    client = Redis.from_url(redis_url, socket_timeout=10)
    async with AsyncOpenAI(base_url=embedding_engine, api_key=ENGINE_API_KEY) as openai:
        embedder = OpenAIEmbedder(openai, model=EMBED_MODEL)
        index = RedisKnowledge(client, prefix=prefix)
        adding = Ingest(index, embedder, "lumen", IngestOptions(base_url=BASE_URL))
        await adding.prepare(EMBED_MODEL)
        outcomes = await adding.add([DOCS])
        assert [o for o in outcomes if o.status != "added"] == []
        yield Corpus(prefix, index, embedder, Retriever(embedder, index))
    await client.aclose()


def env_of(corpus: Corpus, redis_url: str, embeddings: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": corpus.prefix,
        "KB_EMBED_BASE_URL": embeddings,
        "KB_EMBED_API_KEY": ENGINE_API_KEY,
        "DATA_DIR": str(tmp_path / "data"),
    }


async def test_questions_find_the_section_that_answers_them(corpus: Corpus) -> None:
    answerable, follow_ups, out_of_scope = questions()

    async def rank(question: Question) -> Sequence[Hit]:
        return await corpus.retriever.search("lumen", question.text, question.previous)

    scores = await evaluate(rank, answerable, out_of_scope, THRESHOLD)
    # Measured with `python -m bench.kb_retrieval`; the floors leave room for noise.
    assert scores.hit_at_1 >= 0.8, scores
    assert scores.hit_at_5 >= 0.95, scores
    assert scores.answered >= 0.8, scores
    assert scores.refused >= 0.75, scores
    follow = await evaluate(rank, follow_ups, [], THRESHOLD)
    assert follow.hit_at_5 >= 0.6, follow


async def test_passages_fit_the_embedding_model_and_link_to_their_section(
    corpus: Corpus,
) -> None:
    records = await corpus.index.documents("lumen")
    passages = await corpus.index.passages("lumen", [i for r in records for i in r.ids])
    counts = await corpus.embedder.count_tokens(
        [" > ".join(p.titles) + "\n" + p.text for p in passages.values()]
    )
    assert max(counts) <= IngestOptions().max_tokens
    assert {r.doc_id for r in records} == {p.name for p in DOCS.iterdir()}
    links = [p.link or "" for p in passages.values()]
    assert all(link.startswith(BASE_URL) for link in links)
    assert any("#" in link for link in links if link.endswith(".html") is False)


async def test_an_embedding_server_lost_mid_ingest_changes_nothing(
    corpus: Corpus, embedding_engine: str, tmp_path: Path
) -> None:
    port = int(embedding_engine.rsplit(":", 1)[1].split("/")[0])
    guide = tmp_path / "guide.md"
    guide.write_text(
        "# Guide\n\n" + "\n\n".join(f"## Part {n}\n\nVersion one, part {n}." for n in range(70))
    )
    async with (
        CutProxy(port) as proxy,
        AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=ENGINE_API_KEY, max_retries=0) as openai,
    ):
        embedder = Losing(OpenAIEmbedder(openai, model=EMBED_MODEL), proxy)
        adding = Ingest(corpus.index, embedder, "lumen", IngestOptions())
        [first] = await adding.add([guide])
        assert first.status == "added"
        before = await corpus.index.document("lumen", "guide.md")
        guide.write_text(guide.read_text().replace("Version one", "Version two"))
        embedder.lose_after = 1  # the server goes away after one batch of the new version
        [second] = await adding.add([guide])
    assert second.status == "failed" and str(guide) in second.error
    assert await corpus.index.document("lumen", "guide.md") == before
    assert before is not None
    texts = [p.text for p in (await corpus.index.passages("lumen", list(before.ids))).values()]
    assert texts and all("Version one" in text for text in texts)
    assert await corpus.index.remove_document("lumen", "guide.md")


class Losing:
    """The real embedder, whose server stops answering after `lose_after` more batches."""

    def __init__(self, embedder: OpenAIEmbedder, proxy: CutProxy) -> None:
        self._embedder = embedder
        self._proxy = proxy
        self.lose_after: int | None = None

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self.lose_after is not None:
            if self.lose_after == 0:
                self._proxy.down = True
                self._proxy.cut()
            self.lose_after -= 1
        return await self._embedder.embed(texts)

    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return await self._embedder.count_tokens(texts)


def bad_inputs(folder: Path) -> dict[str, str]:
    """Files each refused for its own reason, and what the refusal must say."""
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(text="The Lumen Router ships with a two-year warranty.")
    whole = bytes(pdf.output())
    (folder / "corrupt.pdf").write_bytes(whole[: len(whole) // 2])
    locked = FPDF()
    locked.set_encryption(owner_password="owner", user_password="secret")
    locked.add_page()
    locked.set_font("helvetica", size=12)
    locked.cell(text="Secret text.")
    (folder / "locked.pdf").write_bytes(bytes(locked.output()))
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "empty.md").write_text("  \n\n")
    with (folder / "huge.txt").open("wb") as huge:
        huge.truncate(200 * 1024 * 1024)  # sparse: 200 MB on paper, nothing on disk
    return {
        "corrupt.pdf": "PDF",
        "locked.pdf": "encrypted",
        "binary.txt": "binary",
        "latin1.txt": "UTF-8",
        "empty.md": "no text",
        "huge.txt": "200.0 MB",
    }


async def test_kb_add_reports_each_bad_file_and_adds_the_rest(
    corpus: Corpus, redis_url: str, embedding_engine: str, tmp_path: Path
) -> None:
    env = env_of(corpus, redis_url, embedding_engine, tmp_path)
    folder = tmp_path / "docs"
    folder.mkdir()
    refusals = bad_inputs(folder)
    (folder / "ok.md").write_text("# Good\n\n## Pairing\n\nHold the pair button for 3 s.")
    code, out, err = await bots(env, "kb", "add", "mixed", str(folder), str(folder / "ok.md"))
    assert code == 1, (out, err)
    for name, reason in refusals.items():
        line = next((line for line in err.splitlines() if name in line), "")
        assert reason in line, (name, err)
    assert re.search(r"^added +ok\.md: 1 passage$", out, re.MULTILINE), out
    assert out.count("ok.md") == 1, "the same document given twice is read once"
    code, out, _ = await bots(env, "kb", "list", "mixed")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["ok.md"]
    assert (await bots(env, "kb", "remove", "mixed"))[0] == 0


async def test_two_processes_share_one_index(
    corpus: Corpus, redis_url: str, embedding_engine: str, tmp_path: Path
) -> None:
    env = env_of(corpus, redis_url, embedding_engine, tmp_path)
    question = "how do I update the firmware"
    searches = await asyncio.gather(*(bots(env, "kb", "search", "lumen", question) for _ in "ab"))
    assert [code for code, _, _ in searches] == [0, 0]
    assert searches[0][1] == searches[1][1]
    assert "firmware" in searches[0][1].splitlines()[0].lower()
    extra = tmp_path / "pets.md"
    extra.write_text("# Pets\n\n## Hamster mode\n\nHamster mode dims every light after 9 pm.")
    assert (await bots(env, "kb", "add", "lumen", str(extra)))[0] == 0
    code, out, _ = await bots(env, "kb", "search", "lumen", "what does hamster mode do")
    assert code == 0 and "Pets > Hamster mode" in out.splitlines()[0]
    assert (await bots(env, "kb", "remove", "lumen", "pets.md"))[0] == 0


# ----------------------------------------------------------------------------- answers

QUESTION = "How do I update the firmware on my router?"


@pytest.fixture
async def service(
    corpus: Corpus, engine: str, store: RedisContextStore
) -> AsyncIterator[ConversationService]:
    async with AsyncOpenAI(
        base_url=engine, api_key=ENGINE_API_KEY, max_retries=0,
        timeout=timeouts(connect=3.0, read=120.0),
    ) as client:  # fmt: skip
        model = OpenAIChatModel(client, model="parley", reply_tokens=32)
        policy = ChatPolicy(reply_tokens=32, knowledge_default="lumen")
        yield ConversationService(store, model, policy=policy, knowledge=corpus.retriever)


async def test_discord_shows_the_answer_with_masked_source_links(
    service: ConversationService,
) -> None:
    in_flight = InFlight()
    async with FakeDiscord() as fake:
        settings = DiscordSettings(
            token="test-token",  # type: ignore[arg-type]
            api_base_url=fake.api_base,
            gateway_url=fake.gateway_url,
        )
        running = asyncio.create_task(run_discord(service, settings, in_flight))
        await asyncio.wait_for(fake.identified.wait(), 10)
        message = fake.message(DM, QUESTION, author=user(SNOWFLAKE + 7, "ada"), guild=False)
        await fake.dispatch("MESSAGE_CREATE", message)
        await fake.wait_for(lambda: bool(fake.calls_to("POST", f"/channels/{DM}/messages")), 120)
        await asyncio.wait_for(in_flight.idle(), 120)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    shown = "\n".join(
        c.body["content"] for c in fake.calls if c.path.startswith(f"/channels/{DM}/messages")
    )
    sources = shown.rsplit("-# Sources: ", 1)[1]
    assert f"(<{BASE_URL}firmware.md#" in sources, shown
    assert shown.split("-# Sources: ")[0].strip(), "an answer comes before its sources"


async def test_telegram_shows_the_answer_with_source_links(service: ConversationService) -> None:
    ada = person(41, "Ada")
    async with running_telegram(service) as bot:
        await bot.say(ada, QUESTION)
        await bot.settle(41)
        shown = bot.fake.shown(41)[-1]
    call = bot.fake.calls_to("sendMessage", 41)[-1]
    assert call.params.get("parse_mode") == "HTML"
    final = [c for c in bot.fake.calls if c.params.get("chat_id") in (41, "41")][-1].params["text"]
    assert f'<a href="{BASE_URL}firmware.md#' in final, final
    assert "Sources:" in shown


async def test_the_http_channel_lists_the_sources_in_done(
    corpus: Corpus, engine: str, embedding_engine: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **env_of(corpus, redis_url, embedding_engine, tmp_path),
        "LLM_BASE_URL": engine,
        "LLM_API_KEY": ENGINE_API_KEY,
        "LLM_REPLY_TOKENS": "32",
        "HTTP_PORT": str(port),
    }
    code, key, err = await bots(env, "keys", "create", "support", "--kb", "lumen")
    assert code == 0, err
    headers = {"Authorization": f"Bearer {key.strip()}"}
    async with (
        http_process(env),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120) as api,
    ):
        async with api.stream(
            "POST", "/v1/conversations/c1/messages", json={"text": QUESTION}
        ) as response:
            events = await read_events(response)
        done = events[-1].data
        assert done["text"].strip()
        assert done["sources"] and done["sources"][0]["link"].startswith(f"{BASE_URL}firmware.md")
        answer = await api.post(
            "/v1/conversations/c2/messages",
            json={"text": "What is the best pizza topping?", "stream": False},
        )
        assert answer.json()["text"] == f"{ChatPolicy().no_answer}\n{OFFER}"  # people answer too
        assert answer.json()["sources"] == []
