"""Fine-tune a chat model with LoRA on conversation transcripts; evaluate and merge adapters.

The data is read, checked, tokenized and split by `inference.finetune_data`; the loss counts
assistant tokens only. This module holds what needs torch, transformers and peft.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference.finetune_data import (
    IGNORE_INDEX,
    DataOptions,
    Dataset,
    FinetuneError,
    Sample,
    load_dataset,
)

CHECKPOINTS = "checkpoints"
CHECKPOINT_NAME = re.compile(r"epoch-(\d+)")
CHECKPOINT_STATE = "training-state.pt"
TRAINING_RECORD = "parley-training.json"
WARMUP_SHARE = 0.1


@dataclass(frozen=True)
class LoraOptions:
    """The shape of the adapter."""

    rank: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class TrainOptions:
    """How long and how fast to train."""

    learning_rate: float
    epochs: int
    batch_size: int
    resume: bool


@dataclass(frozen=True)
class LossRow:
    """Held-out loss of one model."""

    model: str
    loss: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@dataclass(frozen=True)
class TrainingReport:
    """What a `finetune` run did and measured."""

    out: Path
    start_epoch: int
    epochs: int
    base: LossRow
    adapter: LossRow
    samples_trained: int
    tokens_trained: int
    train_seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples_trained / self.train_seconds if self.train_seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_trained / self.train_seconds if self.train_seconds else 0.0


# Models.


def load_tokenizer(base: Path) -> Any:
    """Load a local model folder's tokenizer."""
    if not (base / "config.json").is_file():
        raise FinetuneError(f"{base} is not a Hugging Face model folder (no config.json)")
    return AutoTokenizer.from_pretrained(base, local_files_only=True)


def load_model(base: Path) -> Any:
    """Load a local model folder's weights in float32, for the CPU."""
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)


def load_adapter(model: Any, adapter: Path, trainable: bool = False) -> Any:
    """Put a saved LoRA adapter on a base model."""
    if not (adapter / "adapter_config.json").is_file():
        raise FinetuneError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)


def pad_id(tokenizer: Any) -> int:
    """Pick the token that pads batches: the pad token, else end of sequence."""
    token = tokenizer.pad_token_id
    return int(token if token is not None else tokenizer.eos_token_id)


def collate(samples: Sequence[Sample], padding: int) -> dict[str, torch.Tensor]:
    """Pad samples on the right into one batch; padding is masked and never labelled."""
    shape = (len(samples), max(len(sample.input_ids) for sample in samples))
    batch = {
        "input_ids": torch.full(shape, padding),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
        "labels": torch.full(shape, IGNORE_INDEX),
    }
    for row, sample in enumerate(samples):
        width = len(sample.input_ids)
        batch["input_ids"][row, :width] = torch.tensor(sample.input_ids)
        batch["attention_mask"][row, :width] = 1
        batch["labels"][row, :width] = torch.tensor(sample.labels)
    return batch


def held_out_loss(model: Any, samples: Sequence[Sample], batch_size: int, padding: int) -> float:
    """Return the mean loss per labelled token over samples."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start : start + batch_size], padding)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            targets = batch["labels"][:, 1:].flatten()
            predicted = logits.logits[:, :-1].flatten(0, 1)
            loss = F.cross_entropy(predicted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


# Training.


@dataclass(frozen=True)
class Trainer:
    """The adapter under training with its optimizer and learning-rate schedule."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    padding: int


def linear_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm the learning rate up linearly, then decay it linearly to zero."""
    warmup = max(1, round(total_steps * WARMUP_SHARE))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def latest_checkpoint(out: Path) -> tuple[int, Path] | None:
    """Find the last finished epoch's checkpoint under out, if any."""
    found = [
        (int(match.group(1)), folder)
        for folder in (out / CHECKPOINTS).glob("epoch-*")
        if (match := CHECKPOINT_NAME.fullmatch(folder.name))
        and (folder / CHECKPOINT_STATE).is_file()
    ]
    return max(found) if found else None


def save_checkpoint(
    trainer: Trainer, folder: Path, epoch: int, seed: int, lora: LoraOptions
) -> None:
    """Save the adapter, optimizer and schedule after an epoch, to resume from."""
    trainer.model.save_pretrained(folder)
    state = {
        "epoch": epoch,
        "seed": seed,
        "lora": asdict(lora),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
    }
    torch.save(state, folder / CHECKPOINT_STATE)


def restore_checkpoint(trainer: Trainer, folder: Path, seed: int, lora: LoraOptions) -> int:
    """Load a checkpoint's optimizer and schedule; return the epoch it finished."""
    state = torch.load(folder / CHECKPOINT_STATE, weights_only=True)
    if state["seed"] != seed:
        raise FinetuneError(f"{folder} was trained with --seed {state['seed']}, not {seed}")
    if state["lora"] != asdict(lora):
        raise FinetuneError(f"{folder} was trained with other LoRA options: {state['lora']}")
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"])


def new_trainer(
    model: Any, lora: LoraOptions, train: TrainOptions, steps: int, padding: int
) -> Trainer:
    """Wrap a model (or a resumed PeftModel) with an optimizer and schedule."""
    if not isinstance(model, PeftModel):
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate)
    return Trainer(model, optimizer, linear_schedule(optimizer, steps), padding)


def train_epoch(
    trainer: Trainer, samples: Sequence[Sample], batch_size: int, seed: int, bar: Any
) -> int:
    """Train one pass over samples in a seeded order; return the tokens trained on."""
    order = list(samples)
    # Seeding by epoch makes a resumed run follow the same path as an uninterrupted one.
    random.Random(seed).shuffle(order)
    torch.manual_seed(seed)
    trainer.model.train()
    tokens = 0
    for start in range(0, len(order), batch_size):
        batch = collate(order[start : start + batch_size], trainer.padding)
        loss = trainer.model(**batch).loss
        loss.backward()
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad()
        tokens += int(batch["attention_mask"].sum())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update()
    return tokens


def finetune(
    base: Path, data: DataOptions, lora: LoraOptions, train: TrainOptions, out: Path
) -> TrainingReport:
    """Train a LoRA adapter on a data file; save it, its checkpoints and a record in out.

    Args:
        base: a local Hugging Face model folder.
        data: the data file and how to validate and split it.
        lora: the adapter's rank, alpha, dropout and target modules.
        train: learning rate, epochs, batch size, and whether to resume from out.
        out: the folder for the adapter, `checkpoints/epoch-N/` and `parley-training.json`.

    Raises:
        FinetuneError: on bad data, a missing model folder or a checkpoint that does not fit.
    """
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(data.seed)
    tokenizer = load_tokenizer(base)
    dataset = load_dataset(data, tokenizer)
    model = load_model(base)
    checkpoint = latest_checkpoint(out) if train.resume else None
    if train.resume and checkpoint is None:
        print(f"no checkpoint in {out}; starting at epoch 1", file=sys.stderr)
    if checkpoint:
        model = load_adapter(model, checkpoint[1], trainable=True)
    steps_per_epoch = math.ceil(len(dataset.train) / train.batch_size)
    trainer = new_trainer(model, lora, train, steps_per_epoch * train.epochs, pad_id(tokenizer))
    start_epoch = 1
    if checkpoint:
        start_epoch = restore_checkpoint(trainer, checkpoint[1], data.seed, lora) + 1
        print(f"resuming from {checkpoint[1]} at epoch {start_epoch}", file=sys.stderr)

    with trainer.model.disable_adapter():
        base_loss = held_out_loss(
            trainer.model, dataset.held_out, train.batch_size, trainer.padding
        )
    epochs = range(start_epoch, train.epochs + 1)
    tokens, started = 0, time.perf_counter()
    with tqdm(total=steps_per_epoch * len(epochs), unit="step") as bar:
        for epoch in epochs:
            bar.set_description(f"epoch {epoch}/{train.epochs}")
            tokens += train_epoch(
                trainer, dataset.train, train.batch_size, data.seed * 1000 + epoch, bar
            )
            save_checkpoint(trainer, out / CHECKPOINTS / f"epoch-{epoch}", epoch, data.seed, lora)
    seconds = time.perf_counter() - started
    adapter_loss = held_out_loss(trainer.model, dataset.held_out, train.batch_size, trainer.padding)
    trainer.model.save_pretrained(out)
    report = TrainingReport(
        out=out,
        start_epoch=start_epoch,
        epochs=train.epochs,
        base=LossRow("base", base_loss),
        adapter=LossRow(f"adapter {out}", adapter_loss),
        samples_trained=len(dataset.train) * len(epochs),
        tokens_trained=tokens,
        train_seconds=seconds,
    )
    write_record(report, base, dataset, (data, lora, train))
    return report


def write_record(
    report: TrainingReport, base: Path, dataset: Dataset, options: tuple[Any, ...]
) -> None:
    """Write `parley-training.json`: options, sample counts, losses and throughput."""
    settings = {key: value for option in options for key, value in asdict(option).items()}
    record = {
        "base": str(base),
        "data": str(settings.pop("path")),
        "options": settings,
        "samples": {
            "read": dataset.read,
            "kept": len(dataset.train) + len(dataset.held_out),
            "train": len(dataset.train),
            "held_out": len(dataset.held_out),
        },
        "start_epoch": report.start_epoch,
        "epochs": report.epochs,
        "held_out_loss": {"base": report.base.loss, "adapter": report.adapter.loss},
        "perplexity": {"base": report.base.perplexity, "adapter": report.adapter.perplexity},
        "train_seconds": report.train_seconds,
        "samples_per_s": report.samples_per_s,
        "tokens_per_s": report.tokens_per_s,
    }
    (report.out / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")


# Evaluation and merging.


def evaluate(base: Path, data: DataOptions, adapter: Path | None, batch_size: int) -> list[LossRow]:
    """Measure held-out loss of the base model and, if given, of base plus adapter.

    Args:
        base: a local Hugging Face model folder.
        data: the data file, split as `finetune` split it (same seed, share and max length).
        adapter: a folder saved by `finetune`, or None for the base model alone.
        batch_size: samples per forward pass.
    """
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = load_tokenizer(base)
    held_out = load_dataset(data, tokenizer).held_out
    padding = pad_id(tokenizer)
    model = load_model(base)
    rows = [LossRow("base", held_out_loss(model, held_out, batch_size, padding))]
    if adapter is not None:
        model = load_adapter(model, adapter)
        rows.append(
            LossRow(f"adapter {adapter}", held_out_loss(model, held_out, batch_size, padding))
        )
    return rows


def loss_table(rows: Sequence[LossRow]) -> str:
    """Format held-out losses as a small table: model | held-out loss | perplexity."""
    width = max(len("model"), *(len(row.model) for row in rows))
    lines = [f"{'model':<{width}} | held-out loss | perplexity"]
    lines += [f"{row.model:<{width}} | {row.loss:>13.4f} | {row.perplexity:>10.2f}" for row in rows]
    return "\n".join(lines)


def describe(report: TrainingReport) -> str:
    """Summarize a training run: the loss table, then throughput."""
    trained = (
        f"trained epochs {report.start_epoch}-{report.epochs}: "
        f"{report.samples_trained} samples in {report.train_seconds:.1f} s, "
        f"{report.samples_per_s:.2f} samples/s, {report.tokens_per_s:.0f} tokens/s"
        if report.samples_trained
        else f"all {report.epochs} epochs were already trained"
    )
    return f"{loss_table([report.base, report.adapter])}\n{trained}\nadapter saved in {report.out}"


def merge(base: Path, adapter: Path, out: Path) -> Path:
    """Fold an adapter into the base weights and save a plain model folder (float32).

    Args:
        base: the local model folder the adapter was trained on.
        adapter: a folder saved by `finetune`.
        out: where the merged model and its tokenizer go.
    """
    tokenizer = load_tokenizer(base)
    merged = load_adapter(load_model(base), adapter).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
