"""Argument types and the parser class of the `streamrt` command line.

Every type refuses a bad value with a message that says what to pass, and `Parser.error`
turns argparse's complaints into an `InputError`: the CLI prints it as one line, exit 2.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from streamrt.config import COMPILE_MODES
from streamrt.errors import InputError


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are `InputError`s (subparsers inherit the class)."""

    def error(self, message: str):  # type: ignore[override]
        if message.endswith("expected one argument"):
            message += " (write a value that starts with '-' as --option=VALUE)"
        raise InputError(f"{self.prog}: {message} (see {self.prog} --help)")


def count(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """Type of a whole-number option in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < minimum or (maximum is not None and n > maximum):
            top = f" and <= {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{top}, got {n}")
        return n

    parse.__name__ = "count"
    return parse


def number(minimum: float | None = None, *, above: bool = False, maximum: float | None = None):
    """Type of a finite float option, optionally bounded (`above`: strictly greater)."""

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if minimum is not None and (x <= minimum if above else x < minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if above else '>='} {minimum}, got {x:g}"
            )
        if maximum is not None and x > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {x:g}")
        return x

    parse.__name__ = "number"
    return parse


finite = number()
positive = number(0.0, above=True)
non_negative = number(0.0)
probability = number(0.0, maximum=1.0)


def parse_size(text: str, what: str = "--size") -> tuple[int, int]:
    """`"64x48"` -> `(64, 48)` (width, height), both >= 1, or an `InputError` naming `what`."""
    if problem := _size_problem(text):
        raise InputError(f"{what}: {problem}")
    w, h = (int(v) for v in str(text).lower().split("x"))
    return w, h


def _size_problem(text: str) -> str | None:
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().lstrip("+-").isdigit() for p in parts):
        return f"expected WIDTHxHEIGHT in pixels, e.g. 64x64, got {text!r}"
    if any(int(p) < 1 for p in parts):
        return f"width and height must be >= 1, got {text!r}"
    return None


def size(text: str) -> str:
    """Type of a WIDTHxHEIGHT option (kept as text; `parse_size` reads it)."""
    if problem := _size_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def existing_dir(text: str) -> str:
    """Type of an option naming a directory that must exist."""
    if not Path(text).is_dir():
        what = "is a file, not a directory" if Path(text).exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"directory {text} {what}")
    return text


def new_file(text: str) -> str:
    """Type of an option naming a file to write: its directory must exist ('' : none)."""
    parent = Path(text).parent
    if text and not parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"cannot write {text}: directory {parent} does not exist (create it first)"
        )
    return text


def add_rebalance_argument(p: argparse.ArgumentParser) -> None:
    """`--rebalance-every ROUNDS` of `generate` and `serve` on a layer pipeline."""
    p.add_argument(
        "--rebalance-every",
        type=count(1),
        metavar="ROUNDS",
        help="--parallel layers: every ROUNDS rounds, move blocks between ranks (weights and "
        "KV) when the measured per-rank times say that cuts the slowest rank's time by 10%%",
    )


def add_compile_argument(p: argparse.ArgumentParser) -> None:
    """`--compile [MODE]` of the commands that generate (`gen.compile`)."""
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        help="torch.compile the transformer's streaming forward (MODE default: 'default'); "
        "its graphs are built while a stream's window fills (seconds each on a CPU), then "
        "reused for the whole stream",
    )


def compile_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The `gen.compile` override `--compile` asks for (none when it is left out)."""
    mode = getattr(args, "compile", None)
    return {"compile": mode} if mode else {}
