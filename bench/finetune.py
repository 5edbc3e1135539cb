"""Fine-tuning: one LoRA epoch over synthetic support chats on the bundled SmolLM2-135M.

Prints the machine, training throughput (samples/s and tokens/s of the training loop,
held-out evaluation excluded) and held-out loss and perplexity of the base model beside
the adapter. The chats are the test suite's: short questions whose answers all end with
the same sign-off, so a working run shows a clear fall in loss after one epoch.

    python -m bench.finetune [--conversations 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.common import ROOT, machine
from inference.finetune import LoraOptions, TrainOptions, finetune, loss_table
from inference.finetune_data import DataOptions
from tests.finetune_data import support_conversations

MODEL = ROOT / "data" / "models" / "SmolLM2-135M-Instruct"
LORA = LoraOptions(
    rank=8, alpha=16, dropout=0.05, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
)
TRAIN = TrainOptions(learning_rate=5e-4, epochs=1, batch_size=8, resume=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "support.jsonl"
        chats = support_conversations(args.conversations)
        data.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
        options = DataOptions(data, max_length=512, eval_share=0.1, seed=0, strict=True)
        report = finetune(MODEL, options, LORA, TRAIN, Path(folder) / "adapter")
    print(f"machine: {machine()}")
    print(
        f"{MODEL.name}, LoRA rank {LORA.rank} on {','.join(LORA.target_modules)}, "
        f"{args.conversations} chats, {TRAIN.epochs} epoch, batch {TRAIN.batch_size}, "
        f"learning rate {TRAIN.learning_rate:g}"
    )
    print(
        f"training: {report.samples_trained} samples in {report.train_seconds:.1f} s, "
        f"{report.samples_per_s:.2f} samples/s, {report.tokens_per_s:.0f} tokens/s"
    )
    print(loss_table([report.base, replace(report.adapter, model="adapter")]))


if __name__ == "__main__":
    main()
