"""How long the test suite takes, here and at another commit, run back to back.

    python -m bench.suite_time --base REF [pytest arguments...]

REF is checked out into a temporary git worktree (sharing this checkout's `data/`, so
the bundled model is not prepared again) and its suite runs first, with PYTHONPATH on
the worktree so that the processes the tests start import its code too; then this
tree's suite runs. Both use this checkout's virtual environment. Printed: each run's
wall time and outcome, their ratio, and the test files whose time changed the most
(from pytest's `--durations=0`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DURATION = re.compile(r"^\s*([\d.]+)s\s+(?:setup|call|teardown)\s+(tests/[^:]+)::", re.MULTILINE)
OUTCOME = re.compile(r"^=*\s*(.*(?:passed|failed|error).*?)\s*=*$", re.MULTILINE)


def run_suite(tree: Path, extra: list[str]) -> tuple[float, str, dict[str, float]]:
    """Run pytest in `tree`; return its wall time, its closing line and seconds per file."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0"]
    started = time.monotonic()
    done = subprocess.run(
        [*command, *extra], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    wall = time.monotonic() - started
    outcomes = OUTCOME.findall(done.stdout)
    per_file: dict[str, float] = defaultdict(float)
    for seconds, path in DURATION.findall(done.stdout):
        per_file[path] += float(seconds)
    return wall, outcomes[-1] if outcomes else f"exit {done.returncode}", per_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--top", type=int, default=8, help="files to list")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="parley-base-") as folder:
        base = Path(folder) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(base), args.base],
            cwd=ROOT,
            check=True,
        )
        try:
            (base / "data").symlink_to(ROOT / "data")
            before = run_suite(base, extra)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False
            )
    after = run_suite(ROOT, extra)
    print(f"{args.base}: {before[0]:.0f} s ({before[1]})")
    print(f"this tree: {after[0]:.0f} s ({after[1]})")
    print(f"ratio (this tree / {args.base}): {after[0] / before[0]:.2f}")
    files = set(before[2]) | set(after[2])
    changes = sorted(files, key=lambda f: -abs(after[2].get(f, 0.0) - before[2].get(f, 0.0)))
    print(f"test files whose time changed most (seconds, {args.base} -> this tree):")
    for path in changes[: args.top]:
        print(f"  {path}: {before[2].get(path, 0.0):.1f} -> {after[2].get(path, 0.0):.1f}")


if __name__ == "__main__":
    main()
