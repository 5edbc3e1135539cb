"""`python -m inference prepare|serve|finetune|eval|merge`: prepare, serve or fine-tune a model."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bots.settings import SettingsError, load_settings
from inference.finetune_data import DataOptions, FinetuneError
from inference.prepare import BundleMissing, prepare_default_model
from inference.serve import EngineMissing, serve
from inference.settings import InferenceSettings

FINETUNE_COMMANDS = ("finetune", "eval", "merge")


def positive_int(text: str) -> int:
    """Parse a whole number above zero."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not above zero")
    return value


def share(text: str) -> float:
    """Parse a fraction strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return value


def comma_list(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list of names."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that pick the data and split it (finetune and eval must agree)."""
    parser.add_argument("--data", type=Path, required=True, help="JSONL, one chat a line")
    parser.add_argument("--base", type=Path, required=True, help="local Hugging Face model folder")
    parser.add_argument("--max-length", type=positive_int, default=512, help="tokens per sample")
    parser.add_argument("--eval-share", type=share, default=0.1, help="share held out")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split and training")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--strict", action="store_true", help="reject the file on any bad line")


def add_finetune_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `finetune`, `eval` and `merge`."""
    finetune = commands.add_parser("finetune", help="train a LoRA adapter on chat transcripts")
    add_data_arguments(finetune)
    finetune.add_argument("--out", type=Path, required=True, help="folder for the adapter")
    finetune.add_argument("--rank", type=positive_int, default=8)
    finetune.add_argument("--alpha", type=positive_int, default=16)
    finetune.add_argument("--dropout", type=float, default=0.05)
    finetune.add_argument(
        "--target-modules", type=comma_list, default="q_proj,k_proj,v_proj,o_proj"
    )
    finetune.add_argument("--learning-rate", type=float, default=5e-4)
    finetune.add_argument("--epochs", type=positive_int, default=3)
    finetune.add_argument("--resume", action="store_true", help="go on from OUT's last epoch")
    evaluate = commands.add_parser("eval", help="held-out loss of the base model and an adapter")
    add_data_arguments(evaluate)
    evaluate.add_argument("--adapter", type=Path, help="adapter folder saved by finetune")
    merge = commands.add_parser("merge", help="fold an adapter into full model weights")
    merge.add_argument("--base", type=Path, required=True, help="local Hugging Face model folder")
    merge.add_argument("--adapter", type=Path, required=True, help="adapter folder")
    merge.add_argument("--out", type=Path, required=True, help="folder for the merged model")


def run_finetune_command(args: argparse.Namespace) -> int:
    """Run `finetune`, `eval` or `merge`."""
    # Imported here: torch, transformers and peft are heavy, and `serve` must not need them.
    from inference import finetune as ft

    try:
        if args.command == "merge":
            print(f"merged model saved in {ft.merge(args.base, args.adapter, args.out)}")
            return 0
        data = DataOptions(args.data, args.max_length, args.eval_share, args.seed, args.strict)
        if args.command == "eval":
            print(ft.loss_table(ft.evaluate(args.base, data, args.adapter, args.batch_size)))
            return 0
        lora = ft.LoraOptions(args.rank, args.alpha, args.dropout, args.target_modules)
        train = ft.TrainOptions(args.learning_rate, args.epochs, args.batch_size, args.resume)
        print(ft.describe(ft.finetune(args.base, data, lora, train, args.out)))
    except FinetuneError as error:
        print(f"inference: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="convert the bundled default model once")
    serve_parser = commands.add_parser("serve", help="start vLLM's OpenAI-compatible server")
    serve_parser.add_argument(
        "served", nargs="?", default="chat", choices=["chat", "embeddings"],
        help="chat (default): the chat model; embeddings: the knowledge base's embedding model",
    )  # fmt: skip
    add_finetune_commands(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command in FINETUNE_COMMANDS:
        return run_finetune_command(args)
    try:
        settings = load_settings(InferenceSettings)
        if args.command == "prepare":
            print(prepare_default_model(Path(settings.data_dir) / "models"))
        else:
            serve(settings, args.served)
    except (SettingsError, BundleMissing, EngineMissing) as error:
        print(f"inference: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
