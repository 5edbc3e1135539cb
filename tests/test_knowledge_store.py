"""Knowledge bases on the real Redis 8 the tests start: ingest, search, atomic replacement."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bots.core.knowledge import RetrievalPolicy, Retriever
from bots.core.ports import KnowledgeMissing
from bots.knowledge.ingest import Ingest, IngestOptions
from bots.store.knowledge import ModelMismatch, RedisKnowledge
from tests.fakes import WordEmbedder

FAQ = """# Help

## Reset your password

Open Settings, choose Account, then Reset password. A link arrives by email within five
minutes; it works once.

## Delete your account

Write to support from the address of the account. Deletion takes thirty days.
"""

FAQ_V2 = """# Help

## Reset your password

Open Settings, choose Account, then Reset password. A link arrives by email within five
minutes; it works once.

## Change your email address

Open Settings, choose Account, then Email. Confirm the new address from the message sent.
"""


@pytest.fixture
def index(redis_client: Redis, key_prefix: str) -> RedisKnowledge:
    return RedisKnowledge(redis_client, prefix=key_prefix)


async def ingest(
    index: RedisKnowledge, embedder: WordEmbedder, *paths: Path, name: str = "help"
) -> Ingest:
    adding = Ingest(index, embedder, name, IngestOptions(max_tokens=60, overlap_tokens=8))
    await adding.prepare(embedder.model)
    outcomes = await adding.add(list(paths))
    assert all(o.status != "failed" for o in outcomes), outcomes
    return adding


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


async def test_the_test_redis_is_redis_8_with_vector_sets(redis_client: Redis) -> None:
    info = await redis_client.info("server")
    assert int(str(info["redis_version"]).split(".")[0]) >= 8
    assert await redis_client.execute_command("VADD", "probe-vs", "VALUES", 2, 1, 0, "a")  # type: ignore[no-untyped-call]
    await redis_client.delete("probe-vs")


async def test_a_question_finds_its_section_with_title_path_and_link(
    index: RedisKnowledge, tmp_path: Path
) -> None:
    embedder = WordEmbedder()
    await ingest(index, embedder, write(tmp_path, "faq.md", FAQ))
    retriever = Retriever(embedder, index, RetrievalPolicy(top_k=2, threshold=-1))
    hits = await retriever.retrieve("help", "how do I reset my password")
    best = hits[0].passage
    assert best.titles == ("Help", "Reset your password")
    assert best.link == f"{tmp_path / 'faq.md'}#reset-your-password"
    assert "Reset password" in best.text
    assert hits[0].score > hits[1].score
    assert await index.names() == ["help"]


async def test_re_adding_replaces_the_document_and_embeds_only_changed_passages(
    index: RedisKnowledge, tmp_path: Path
) -> None:
    embedder = WordEmbedder()
    path = write(tmp_path, "faq.md", FAQ)
    await ingest(index, embedder, path)
    first = len(embedder.embedded)
    path.write_text(FAQ_V2)
    adding = Ingest(index, embedder, "help", IngestOptions(max_tokens=60, overlap_tokens=8))
    [outcome] = await adding.add([path])
    assert (outcome.status, outcome.passages, outcome.embedded) == ("replaced", 2, 1)
    assert len(embedder.embedded) == first + 1  # the unchanged section kept its vector
    texts = [p.text for p in (await index.passages("help", [*await _ids(index)])).values()]
    assert any("Email" in text for text in texts)
    assert not any("Deletion" in text for text in texts)
    # The vector set holds exactly the live passages: nothing old, nothing staged.
    assert await index.vectors("help") == 2
    [again] = await adding.add([path])
    assert again.status == "unchanged" and len(embedder.embedded) == first + 1


async def _ids(index: RedisKnowledge) -> list[str]:
    return [pid for record in await index.documents("help") for pid in record.ids]


async def test_searches_during_a_re_add_see_one_version_whole(
    index: RedisKnowledge, tmp_path: Path
) -> None:
    old = "\n\n".join(f"## Old topic {n}\n\nalpha old passage number {n}." for n in range(40))
    new = "\n\n".join(f"## New topic {n}\n\nalpha new passage number {n}." for n in range(40))
    path = write(tmp_path, "big.md", "# Big\n\n" + old)
    embedder = WordEmbedder()
    await ingest(index, embedder, path)
    path.write_text("# Big\n\n" + new)
    adding = Ingest(index, embedder, "help", IngestOptions(max_tokens=60, overlap_tokens=0))
    seen: list[set[str]] = []
    done = asyncio.Event()

    async def search() -> None:
        vector = (await embedder.embed(["alpha passage"]))[0]
        while not done.is_set():
            hits = await index.search("help", [vector], 80)
            seen.append({"old" if " old " in h.passage.text else "new" for h in hits})
            await asyncio.sleep(0)

    searching = [asyncio.create_task(search()) for _ in range(4)]
    await adding.add([path])
    done.set()
    await asyncio.gather(*searching)
    assert all(len(kinds) == 1 for kinds in seen), "a search saw half of each version"
    assert seen[0] == {"old"} and seen[-1] == {"new"}
    assert len(await index.search("help", [(await embedder.embed(["alpha"]))[0]], 100)) == 40


async def test_an_embedding_server_down_mid_ingest_leaves_the_old_version_served(
    index: RedisKnowledge, tmp_path: Path
) -> None:
    long_v1 = "# Guide\n\n" + "\n\n".join(f"## Step {n}\n\nfirst version {n}." for n in range(80))
    long_v2 = "# Guide\n\n" + "\n\n".join(f"## Step {n}\n\nsecond version {n}." for n in range(80))
    path = write(tmp_path, "guide.md", long_v1)
    embedder = WordEmbedder()
    await ingest(index, embedder, path)
    before = await index.documents("help")
    path.write_text(long_v2)
    embedder.fail_after = embedder.calls + 1  # one batch of 32 embeds, then the server is gone
    adding = Ingest(index, embedder, "help", IngestOptions(max_tokens=60, overlap_tokens=0))
    [outcome] = await adding.add([path])
    assert outcome.status == "failed" and outcome.servers_failed
    assert str(path) in outcome.error and "still served" in outcome.error
    assert await index.documents("help") == before
    texts = [p.text for p in (await index.passages("help", list(before[0].ids))).values()]
    assert len(texts) == 80 and all("first version" in text for text in texts)
    # The passages staged before the failure are gone again.
    assert await index.vectors("help") == 80


async def test_a_bad_file_is_reported_and_the_others_are_added(
    index: RedisKnowledge, tmp_path: Path
) -> None:
    write(tmp_path, "faq.md", FAQ)
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.7\nnot really a pdf")
    embedder = WordEmbedder()
    adding = Ingest(index, embedder, "help", IngestOptions(max_tokens=60, overlap_tokens=8))
    await adding.prepare(embedder.model)
    outcomes = {o.doc_id: o for o in await adding.add([tmp_path])}
    assert outcomes["faq.md"].status == "added"
    assert outcomes["broken.pdf"].status == "failed"
    assert "broken.pdf" in outcomes["broken.pdf"].error
    assert [r.doc_id for r in await index.documents("help")] == ["faq.md"]


async def test_removing_a_document_or_a_base(index: RedisKnowledge, tmp_path: Path) -> None:
    embedder = WordEmbedder()
    await ingest(index, embedder, write(tmp_path, "faq.md", FAQ), write(tmp_path, "b.txt", "hi"))
    assert await index.remove_document("help", "faq.md")
    assert not await index.remove_document("help", "faq.md")
    assert [r.doc_id for r in await index.documents("help")] == ["b.txt"]
    assert await index.remove("help")
    assert await index.names() == []
    with pytest.raises(KnowledgeMissing):
        await index.search("help", [[1.0] * embedder.dimension], 3)


async def test_a_base_refuses_vectors_of_another_model(index: RedisKnowledge) -> None:
    await index.create("help", "word-hash", 64)
    await index.create("help", "word-hash", 64)  # the same again is fine
    with pytest.raises(ModelMismatch, match="word-hash"):
        await index.create("help", "other-model", 384)
