"""What every `earlyexit-*` command shares: bad usage is one clear line on stderr, exit code 2;
and one log set-up (`setup_cli_logging`).

argparse's own error() prints the whole usage block; the contract asks for one line. This
module needs only the standard library, so `training` and `thresholds` CLIs can use it too.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from serving.providers import normalize_providers


class UsageError(Exception):
    """Bad flags or bad input: reported as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def providers_arg(value: str) -> tuple[str, ...]:
    """argparse `type` of `--providers`: "cuda,cpu" → onnxruntime names; bad names are a usage
    error naming the valid ones."""
    try:
        providers = tuple(normalize_providers(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not providers:
        raise argparse.ArgumentTypeError('name at least one execution provider, e.g. "cpu"')
    return providers


def parse_or_exit(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """`parser.parse_args(argv)`; a usage error prints `PROG: error: MESSAGE` and exits 2."""
    try:
        return parser.parse_args(argv)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def setup_cli_logging(quiet: bool = False, verbose: bool = False, timestamps: bool = False) -> None:
    """Log lines on stderr for a command-line run: INFO by default, WARNING with --quiet, DEBUG
    with --verbose; `timestamps` for long runs (training, tuning) whose log is read later."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    prefix = "%(asctime)s " if timestamps else ""
    logging.basicConfig(
        level=level, stream=sys.stderr, format=prefix + "%(levelname)s %(name)s: %(message)s"
    )
