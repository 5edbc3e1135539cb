"""Knowledge bases in Redis 8: passages in a vector set, their text and documents in hashes.

Each knowledge base's keys share one hash tag (one cluster slot), so the scripts below
run on all of them atomically:

- `…:vs`: the vector set; an element per passage, named by its document and its text's
  hash, with the attribute `{"l":1}` once live (`{"l":0}` while staged).
- `…:p`: passage id -> its JSON (document, title path, link, text).
- `…:docs`: document id -> its JSON (path, title, file hash, passage ids, when added).
- `…:meta`: the embedding model and dimension the base was built with.

A document is replaced by staging its new passages (embedded, invisible to searches),
then publishing them in one script that makes them live and removes the old ones: a
search sees the old version whole or the new one whole, never half of each. Passages
whose text did not change keep their element and are not embedded again.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bots.core.models import Hit, Passage
from bots.core.ports import KnowledgeMissing, KnowledgeUnavailable, StoreUnavailable
from bots.store.errors import store_errors

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
LIVE, STAGED = '{"l":1}', '{"l":0}'
STAGE_BATCH = 256  # VADDs per pipeline

SEARCH = """
if redis.call('EXISTS', KEYS[3]) == 0 then return redis.error_reply('MISSING') end
local best = {}
for i = 2, #ARGV, 2 do
  local found = redis.call('VSIM', KEYS[1], 'FP32', ARGV[i + 1], 'WITHSCORES',
                           'COUNT', ARGV[1], 'FILTER', '.l == 1')
  for j = 1, #found, 2 do
    local score = tonumber(found[j + 1]) - tonumber(ARGV[i])
    if best[found[j]] == nil or best[found[j]] < score then best[found[j]] = score end
  end
end
local out = {}
for id, score in pairs(best) do
  local passage = redis.call('HGET', KEYS[2], id)
  if passage then
    out[#out + 1] = id
    out[#out + 1] = tostring(score)
    out[#out + 1] = passage
  end
end
return out
"""

PUBLISH = """
for i = 3, #ARGV, 2 do
  if redis.call('VISMEMBER', KEYS[1], ARGV[i]) == 0 then
    return redis.error_reply('NOT STAGED ' .. ARGV[i])
  end
end
local new = {}
for i = 3, #ARGV, 2 do
  new[ARGV[i]] = true
  redis.call('VSETATTR', KEYS[1], ARGV[i], '{"l":1}')
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
local old = redis.call('HGET', KEYS[3], ARGV[1])
if old then
  for _, id in ipairs(cjson.decode(old)['ids']) do
    if not new[id] then
      redis.call('VREM', KEYS[1], id)
      redis.call('HDEL', KEYS[2], id)
    end
  end
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
"""

REMOVE_DOCUMENT = """
local old = redis.call('HGET', KEYS[3], ARGV[1])
if not old then return 0 end
for _, id in ipairs(cjson.decode(old)['ids']) do
  redis.call('VREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

# Staged elements of a failed ingest go; a live one (published meanwhile) stays.
DISCARD = """
local removed = 0
for i = 1, #ARGV do
  if redis.call('VGETATTR', KEYS[1], ARGV[i]) == '{"l":0}' then
    removed = removed + redis.call('VREM', KEYS[1], ARGV[i])
  end
end
return removed
"""


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    """A document as its knowledge base keeps it."""

    doc_id: str
    path: str
    title: str
    sha256: str  # of the file's bytes: an unchanged file is not read again
    ids: tuple[str, ...]  # its passages, in order
    added: float


@dataclass(frozen=True, slots=True)
class BaseInfo:
    """A knowledge base's summary."""

    name: str
    model: str
    dimension: int
    documents: int
    passages: int
    memory_bytes: int


class ModelMismatch(ValueError):
    """The knowledge base was built with another embedding model."""


def fp32(vector: Sequence[float]) -> bytes:
    """A vector as VADD's and VSIM's FP32 blob."""
    return struct.pack(f"<{len(vector)}f", *vector)


class RedisKnowledge:
    """Knowledge bases on Redis 8 vector sets; every bot replica reads the same ones."""

    def __init__(self, client: Redis, *, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._search = client.register_script(SEARCH)
        self._publish = client.register_script(PUBLISH)
        self._remove_document = client.register_script(REMOVE_DOCUMENT)
        self._discard = client.register_script(DISCARD)

    def key(self, name: str, kind: str) -> str:
        """Name one of a knowledge base's keys; all of them share one cluster slot."""
        return f"{self._prefix}:kb:{{{name}}}:{kind}"

    def _keys(self, name: str) -> list[str]:
        return [self.key(name, "vs"), self.key(name, "p"), self.key(name, "docs")]

    # ------------------------------------------------------------------ reading

    async def search(
        self,
        name: str,
        vectors: Sequence[Sequence[float]],
        count: int,
        discounts: Sequence[float] = (),
    ) -> list[Hit]:
        keys = [self.key(name, "vs"), self.key(name, "p"), self.key(name, "meta")]
        args: list[Any] = [count]
        for n, vector in enumerate(vectors):
            # Scores are (1 + cosine) / 2 there: half the cosine discount.
            args += [(discounts[n] if n < len(discounts) else 0.0) / 2, fp32(vector)]
        with store_errors():
            try:
                found = await self._search(keys=keys, args=args)
            except ResponseError as error:  # an answer, not a lost connection
                if "MISSING" in str(error):
                    raise KnowledgeMissing(f"there is no knowledge base {name!r}") from error
                raise KnowledgeUnavailable(f"knowledge base {name!r}: {error}") from error
        hits = [
            # Vector sets score (1 + cosine) / 2; Parley speaks cosine.
            Hit(_passage(found[i].decode(), found[i + 2]), 2 * float(found[i + 1]) - 1)
            for i in range(0, len(found), 3)
        ]
        return sorted(hits, key=lambda hit: (-hit.score, hit.passage.id))[:count]

    async def passages(self, name: str, ids: Sequence[str]) -> dict[str, Passage]:
        if not ids:
            return {}
        with store_errors():
            found = await self._client.hmget(self.key(name, "p"), list(ids))
        return {pid: _passage(pid, raw) for pid, raw in zip(ids, found, strict=True) if raw}

    async def exists(self, name: str) -> bool:
        with store_errors():
            return bool(await self._client.exists(self.key(name, "meta")))

    async def names(self) -> list[str]:
        with store_errors():
            found = await self._client.smembers(f"{self._prefix}:kbs")
        return sorted(_text(name) for name in found)

    async def info(self, name: str) -> BaseInfo | None:
        """A knowledge base's model, size and memory; None if there is none of that name."""
        with store_errors():
            meta = await self._client.hgetall(self.key(name, "meta"))
            if not meta:
                return None
            documents = await self._client.hlen(self.key(name, "docs"))
            passages = await self._client.hlen(self.key(name, "p"))
            memory = 0
            for key in (*self._keys(name), self.key(name, "meta")):
                memory += await self._client.memory_usage(key, samples=0) or 0
        fields = {_text(k): _text(v) for k, v in meta.items()}
        return BaseInfo(name, fields["model"], int(fields["dim"]), documents, passages, int(memory))

    async def vectors(self, name: str) -> int:
        """How many vectors the base's set holds, staged ones included."""
        with store_errors():
            count = await self._client.execute_command("VCARD", self.key(name, "vs"))  # type: ignore[no-untyped-call]
        return int(count or 0)

    async def documents(self, name: str) -> list[DocumentRecord]:
        """Every document of a knowledge base, by id."""
        with store_errors():
            found = await self._client.hgetall(self.key(name, "docs"))
        return sorted((_record(_text(k), v) for k, v in found.items()), key=lambda r: r.doc_id)

    async def document(self, name: str, doc_id: str) -> DocumentRecord | None:
        with store_errors():
            raw = await self._client.hget(self.key(name, "docs"), doc_id)
        return None if raw is None else _record(doc_id, raw)

    # ------------------------------------------------------------------ writing

    async def create(self, name: str, model: str, dimension: int) -> None:
        """Make the knowledge base if it is new; refuse one built with another model."""
        meta = self.key(name, "meta")
        with store_errors():
            await self._require_vector_sets()
            created = await self._client.hsetnx(meta, "model", model)
            if created:
                await self._client.hset(meta, mapping={"dim": dimension, "created": time.time()})
                await self._client.sadd(f"{self._prefix}:kbs", name)
                return
            fields = await self._client.hmget(meta, ["model", "dim"])
        known_model, known_dim = _text(fields[0]), int(_text(fields[1]) or 0)
        if known_dim and (known_model != model or known_dim != dimension):
            raise ModelMismatch(
                f"knowledge base {name!r} was built with {known_model} ({known_dim} dimensions),"
                f" not {model} ({dimension}); remove it first to build it again with {model}"
            )

    async def _require_vector_sets(self) -> None:
        try:
            await self.vectors("")
        except StoreUnavailable as error:
            if "unknown command" not in str(error).lower():
                raise
            version = (await self._client.info("server")).get("redis_version", "?")
            raise KnowledgeUnavailable(
                f"this Redis ({version}) has no vector sets: knowledge bases need Redis 8"
            ) from error

    async def stage(self, name: str, vectors: Sequence[tuple[str, Sequence[float]]]) -> None:
        """Add passages' vectors, invisible to searches until `publish`."""
        with store_errors():
            for start in range(0, len(vectors), STAGE_BATCH):
                async with self._client.pipeline(transaction=False) as pipe:
                    for pid, vector in vectors[start : start + STAGE_BATCH]:
                        pipe.execute_command(
                            "VADD", self.key(name, "vs"), "FP32", fp32(vector), pid,
                            "SETATTR", STAGED,
                        )  # fmt: skip
                    await pipe.execute()

    async def staged(self, name: str, ids: Sequence[str]) -> set[str]:
        """Which of these passages have a vector already (live or staged)."""
        if not ids:
            return set()
        with store_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for pid in ids:
                    pipe.execute_command("VISMEMBER", self.key(name, "vs"), pid)
                found = await pipe.execute()
        return {pid for pid, member in zip(ids, found, strict=True) if member}

    async def publish(self, name: str, record: DocumentRecord, passages: Sequence[Passage]) -> None:
        """Make a document's staged passages live and drop its old ones, in one step."""
        args: list[str] = [record.doc_id, _record_json(record)]
        for passage in passages:
            args += [passage.id, _passage_json(passage)]
        with store_errors():
            await self._publish(keys=self._keys(name), args=args)

    async def discard(self, name: str, ids: Sequence[str]) -> None:
        """Remove staged passages that were never published (a failed ingest)."""
        if ids:
            with store_errors():
                await self._discard(keys=[self.key(name, "vs")], args=list(ids))

    async def remove_document(self, name: str, doc_id: str) -> bool:
        """Remove a document and its passages, in one step; False if there is none."""
        with store_errors():
            return bool(await self._remove_document(keys=self._keys(name), args=[doc_id]))

    async def remove(self, name: str) -> bool:
        """Remove a whole knowledge base; False if there is none."""
        with store_errors():
            removed = await self._client.delete(*self._keys(name), self.key(name, "meta"))
            await self._client.srem(f"{self._prefix}:kbs", name)
        return bool(removed)


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _passage_json(passage: Passage) -> str:
    record = {
        "doc": passage.doc,
        "titles": passage.titles,
        "link": passage.link,
        "text": passage.text,
    }
    return json.dumps(record, ensure_ascii=False)


def _passage(pid: str, raw: bytes | str) -> Passage:
    record = json.loads(raw)
    return Passage(pid, record["doc"], tuple(record["titles"]), record["link"], record["text"])


def _record_json(record: DocumentRecord) -> str:
    return json.dumps(
        {
            "path": record.path,
            "title": record.title,
            "sha256": record.sha256,
            "ids": record.ids,
            "added": record.added,
        },
        ensure_ascii=False,
    )


def _record(doc_id: str, raw: bytes | str) -> DocumentRecord:
    data = json.loads(raw)
    return DocumentRecord(
        doc_id, data["path"], data["title"], data["sha256"], tuple(data["ids"]), data["added"]
    )
