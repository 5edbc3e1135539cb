"""LoRA fine-tuning on the bundled SmolLM2-135M: data checks, masking, training, resume, merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from inference.__main__ import main
from inference.finetune import TRAINING_RECORD, load_model, load_tokenizer
from inference.finetune_data import IGNORE_INDEX, DataOptions, load_dataset, render
from tests.conftest import ROOT
from tests.finetune_data import (
    HELD_OUT_QUESTION,
    MODEL,
    SHORT_LENGTH,
    support_conversations,
    write_jsonl,
)


def finetune_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--data", str(data), "--base", str(MODEL), "--out", str(out), *extra]


def greedy_reply(model: Any, tokenizer: Any, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    reply: str = tokenizer.decode(
        output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return reply


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(MODEL)


@pytest.fixture
def adapter(support_adapter: Path) -> Path:
    return support_adapter


BAD_LINES = [
    json.dumps(support_conversations(1)[0]),
    '{"messages": [',
    "[1, 2]",
    '{"messages": []}',
    json.dumps({"messages": [{"role": "bot", "content": "hi"}]}),
    json.dumps({"messages": [{"role": "user", "content": ["hi"]}]}),
    json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "system", "content": "be brief"},
                {"role": "assistant", "content": "ok"},
            ]
        }
    ),
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": "talk"},
                {"role": "assistant", "content": "word " * 300},
            ]
        }
    ),
    json.dumps(support_conversations(2)[1]),
    json.dumps({**support_conversations(3)[2], "id": "extra keys are ignored"}),
]
EXPECTED_PROBLEMS = [
    "line 2: malformed JSON",
    "line 3: not a JSON object",
    "line 4: 'messages' is missing or empty",
    "line 5: role 'bot' is not system, user or assistant",
    "line 6: message 1: content is not a string",
    "line 7: no assistant turn",
    "line 8: message 2: a system turn must come first",
    "line 9: ",
]


def test_bad_lines_are_reported_and_skipped(
    tmp_path: Path, tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    options = DataOptions(data, max_length=SHORT_LENGTH, eval_share=0.1, seed=0, strict=False)

    dataset = load_dataset(options, tokenizer)

    errors = capsys.readouterr().err.splitlines()
    for expected in EXPECTED_PROBLEMS:
        assert any(line.startswith(expected) and line.endswith("; skipped") for line in errors)
    assert any("line 9: " in line and "longer than --max-length 128" in line for line in errors)
    assert "kept 3 of 11 conversations" in errors
    assert sorted(s.line for s in dataset.train + dataset.held_out) == [1, 10, 11]


def test_strict_rejects_the_file_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    out = tmp_path / "out"

    code = main(finetune_args(data, out, "--strict", "--max-length", str(SHORT_LENGTH)))

    errors = capsys.readouterr().err
    assert code == 2
    for expected in EXPECTED_PROBLEMS:
        assert expected in errors
    assert "8 bad lines; rejected (--strict)" in errors
    assert not out.exists()


DATA_CHECKS_ALONE = """
import sys
from pathlib import Path
from inference.finetune_data import read_conversations
_, problems, _ = read_conversations(Path(sys.argv[1]))
print(*problems, sep="\\n")
print("torch imported:", "torch" in sys.modules)
"""


def test_the_data_checks_run_without_torch(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)

    done = subprocess.run(
        [sys.executable, "-c", DATA_CHECKS_ALONE, str(data)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "torch imported: False"
    for expected in EXPECTED_PROBLEMS[:-1]:  # line 9 is too long only once tokenized
        assert expected in done.stdout


def test_no_usable_conversation_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES[1:4])

    assert main(finetune_args(data, tmp_path / "out")) == 2
    assert "0 usable conversations; at least 2 are needed" in capsys.readouterr().err


def test_only_assistant_turns_are_labelled(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "2 plus 2 is 4."},
        {"role": "user", "content": "And the capital of Peru?"},
        {"role": "assistant", "content": "It is Lima."},
    ]

    sample = render(tokenizer, 1, messages)

    labelled = [token for token in sample.labels if token != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "2 plus 2 is 4.<|im_end|>It is Lima.<|im_end|>"
    assert all(
        label in (token, IGNORE_INDEX)
        for token, label in zip(sample.input_ids, sample.labels, strict=True)
    )


def test_training_teaches_the_sign_off(adapter: Path) -> None:
    record = json.loads((adapter / TRAINING_RECORD).read_text())
    base_loss, adapter_loss = record["held_out_loss"]["base"], record["held_out_loss"]["adapter"]
    print(f"held-out loss: base {base_loss:.4f}, adapter {adapter_loss:.4f}")
    assert adapter_loss < 0.7 * base_loss
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert record["samples"] == {"read": 48, "kept": 48, "train": 43, "held_out": 5}
    assert record["options"]["rank"] == 8 and record["samples_per_s"] > 0

    tokenizer = load_tokenizer(MODEL)
    model = load_model(MODEL)
    base_reply = greedy_reply(model, tokenizer, HELD_OUT_QUESTION)
    tuned_reply = greedy_reply(
        PeftModel.from_pretrained(model, adapter), tokenizer, HELD_OUT_QUESTION
    )
    print(f"base reply: {base_reply!r}\nadapter reply: {tuned_reply!r}")
    assert tuned_reply.rstrip().endswith("Parley Support")
    assert "Parley Support" not in base_reply


def test_eval_reproduces_the_held_out_split(
    adapter: Path, support_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--data", str(support_data), "--base", str(MODEL), "--adapter", str(adapter)]

    assert main(["eval", *args, "--max-length", str(SHORT_LENGTH)]) == 0

    table = capsys.readouterr().out.splitlines()
    record = json.loads((adapter / TRAINING_RECORD).read_text())["held_out_loss"]
    assert [cell.strip() for cell in table[0].split("|")] == [
        "model",
        "held-out loss",
        "perplexity",
    ]
    losses = [float(row.split("|")[1]) for row in table[1:]]
    assert losses == pytest.approx([record["base"], record["adapter"]], abs=1e-3)


def test_resume_skips_finished_epochs(
    support_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "few.jsonl", support_data.read_text().splitlines()[:8])
    out = tmp_path / "out"
    options = ["--max-length", "64", "--batch-size", "8"]
    assert main(finetune_args(data, out, "--epochs", "1", *options)) == 0
    first = out / "checkpoints" / "epoch-1" / "training-state.pt"
    first_written = first.stat().st_mtime_ns
    capsys.readouterr()

    assert main(finetune_args(data, out, "--epochs", "2", "--resume", *options)) == 0

    assert f"resuming from {first.parent} at epoch 2" in capsys.readouterr().err
    record = json.loads((out / TRAINING_RECORD).read_text())
    assert (record["start_epoch"], record["epochs"]) == (2, 2)
    assert first.stat().st_mtime_ns == first_written
    assert (out / "checkpoints" / "epoch-2" / "training-state.pt").is_file()
    assert (out / "adapter_model.safetensors").is_file()


def test_merged_model_matches_base_plus_adapter(adapter: Path, tmp_path: Path) -> None:
    merged_folder = tmp_path / "merged"

    assert (
        main(
            ["merge", "--base", str(MODEL), "--adapter", str(adapter), "--out", str(merged_folder)]
        )
        == 0
    )

    assert not (merged_folder / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(
        merged_folder, dtype=torch.float32, local_files_only=True
    )
    tokenizer = load_tokenizer(merged_folder)
    with_adapter = PeftModel.from_pretrained(load_model(MODEL), adapter)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": HELD_OUT_QUESTION}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        expected = with_adapter(**inputs).logits
        actual = merged(**inputs).logits
    # Merged weights sum in another order: float32 logits near 25 differ by about 1e-4.
    torch.testing.assert_close(actual, expected, atol=5e-4, rtol=1e-5)
