"""`python -m inference prepare|serve`: prepare the default model, or serve it with vLLM."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bots.settings import SettingsError, load_settings
from inference.prepare import BundleMissing, prepare_default_model
from inference.serve import EngineMissing, serve
from inference.settings import InferenceSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="convert the bundled default model once")
    commands.add_parser("serve", help="start vLLM's OpenAI-compatible server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(InferenceSettings)
        if args.command == "prepare":
            print(prepare_default_model(Path(settings.data_dir) / "models"))
        else:
            serve(settings)
    except (SettingsError, BundleMissing, EngineMissing) as error:
        print(f"inference: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
