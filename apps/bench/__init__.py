"""`streamrt bench`: each suite measures against a baseline in the same run and prints a table."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def best_of(repeats: int, fn: Callable[[], Any]) -> float:
    """Fastest wall time of `repeats` calls of `fn` (noise on shared machines only adds time)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == columns[0] else "right")
    for row in rows:
        table.add_row(*[_fmt(row.get(c, "")) for c in columns])
    Console().print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
        Console(stderr=True).print(f"wrote {path}")


def run_bench(args: argparse.Namespace) -> int:
    if args.suite == "cache":
        from streamrt.apps.bench.cache import bench_cache

        return bench_cache(args)
    if args.suite == "compile":
        from streamrt.apps.bench.compile import bench_compile

        return bench_compile(args)
    if args.suite == "quality":
        from streamrt.apps.bench.quality import bench_quality

        return bench_quality(args)
    if args.suite == "pipeline":
        from streamrt.apps.bench.pipeline import bench_pipeline

        return bench_pipeline(args)
    if args.suite == "gen":
        from streamrt.apps.bench.gen import bench_gen

        return bench_gen(args)
    if args.suite == "peers":
        from streamrt.apps.bench.peers import bench_peers

        return bench_peers(args)
    if args.suite == "serve":
        from streamrt.apps.bench.serve import bench_serve

        return bench_serve(args)
    if args.suite == "agents":
        from streamrt.apps.bench.agents import bench_agents

        return bench_agents(args)
    if args.suite == "qa":
        from streamrt.apps.bench.qa import bench_qa

        return bench_qa(args)
    from streamrt.errors import InputError

    raise InputError(
        f"unknown bench suite {args.suite!r}: cache, gen, quality, qa, pipeline, peers, serve "
        "or agents"
    )
