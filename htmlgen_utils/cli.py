"""The command line every entry point shares: --preset, --dataset, --run-dir, -p KEY VALUE; and mistakes answered
with one line instead of a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from .config import PRESETS, Config, default_preset

# What a user's mistake raises (a bad value, a missing file, a gated model): one line. Anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, OSError)  # OSError: missing files, gated models; ValueError: bad values, bad data


def config_from_args(
    argv: list[str] | None = None, description: str = "", training: bool = False, pipeline: bool = False
) -> tuple[Config, argparse.Namespace]:
    """Parse the shared options (and, with `training`, --no-resume / --fresh-start; with `pipeline`, --notebooks)
    into a `Config`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--preset",
        default=None,
        help=f"{' | '.join(PRESETS)} (default: the one that fits this machine; tiny without a GPU)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="'bundled', a named corpus (websight-described, jawerty-html), "
        "a hub id, or a local .json/.jsonl/.csv file",
    )
    parser.add_argument("--run-dir", default=None, help="where every artifact goes")
    parser.add_argument(
        "-p",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="override any Config field, e.g. -p max_steps 20",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    if training:
        parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the run directory")
        parser.add_argument(
            "--fresh-start",
            action="store_true",
            help="forget a previous run in the run directory (checkpoints, adapter) and train anew",
        )
    if pipeline:
        parser.add_argument("--notebooks", default="", help="run only these, by number: e.g. 04,05 (default: all)")
        parser.add_argument(
            "--publish",
            action="store_true",
            help="run the chain in a fresh folder and write the executed copies, outputs kept and "
            "this machine's paths removed, to notebooks/executed/ (committed for readers)",
        )
    args = parser.parse_args(argv)
    if args.debug:
        os.environ["HTMLGEN_DEBUG"] = "1"
    preset = args.preset or default_preset()
    overrides = {key: Config.parse_value(value) for key, value in args.p}
    if args.dataset:
        overrides["dataset"] = args.dataset
    if args.run_dir:
        overrides["run_dir"] = args.run_dir
    return Config.from_preset(preset, **overrides), args


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point; a user's mistake ends it with one line on stderr and exit status 2."""
    try:
        status = main()
    except USER_ERRORS as error:
        if os.environ.get("HTMLGEN_DEBUG"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)
