"""`streamrt bench qa`: mechanics of the streaming video QA memory (ReKV), not answer quality.

encode FPS              frames fed per second (vision tower + prefill on [sink | window]),
                        overall and per segment between points
answer latency          after 1 min / 10 min / 1 h of a 1 fps stream (60 / 600 / 3600 frames
                        fed as fast as possible), against re-prefill: the stock language model
                        run over [system | every frame's tokens | question] for each question,
                        then the same number of greedy tokens (visual embeddings given, so the
                        baseline is not charged for re-running the vision tower)
device memory           the cache manager's device-tier bytes at each point (bounded: sink +
                        window), beside the KV bytes re-prefill holds
needle accuracy         streams of 1x / 10x / 100x the window with one needle frame at a random
                        place; "accurate" = the needle is among the frames the answer used
                        (`Answer.timestamps`). window-only answers from [sink | window];
                        retrieval is ReKV. With the tiny random model, layer 0 is hand-set as
                        in the unit tests (keys and queries along the needle's embedding, the
                        word "needle" embedded as the needle) so the needle is retrievable in
                        principle; the other layers stay random.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamrt.apps.bench import best_of, print_table, write_json
from streamrt.config import QAConfig
from streamrt.qa import VideoQA

TINY_RANDOM = "tiny-random"
SYSTEM = "system what color is the circle"
QUESTION = "what color was the circle ?"
POINTS = (("1 min", 60), ("10 min", 600), ("1 h", 3600))
FEED_BATCH = 30


class BenchQA(VideoQA):
    """A session that can also answer from [sink | window] only: the no-retrieval baseline."""

    window_only = False
    """True: every layer attends to the sink and the recent window, nothing retrieved."""

    def _select(self, ids: list[int], frames: list[int], cutoff: int) -> list[list[int]]:
        if not self.window_only:
            return super()._select(ids, frames, cutoff)
        plan = self.memory.window_plan(before=cutoff)
        window = [i for i in plan.indices if i >= self.memory.num_sink]
        return [window] * self.adapter.num_layers


# ---------------------------------------------------------------------- setup


def _load(model: str) -> tuple[Any, Any, bool]:
    """(adapter, tokenizer, is the tiny random model)."""
    import transformers
    from transformers import AutoTokenizer

    from streamrt.models.vlm import load_adapter

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tiny = model == TINY_RANDOM
    path: str | Path = model
    if tiny:
        from streamrt.models.vlm_tiny import save_tiny_vlm

        path = save_tiny_vlm(Path(tempfile.mkdtemp(prefix="streamrt-bench-qa-")), "smolvlm")
    elif not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(
            f"no Video-LLM at {model}: pass --model DIR (SmolVLM, LLaVA-OneVision, Qwen2-VL) "
            f"or --model {TINY_RANDOM}"
        )
    adapter, tokenizer = load_adapter(path), AutoTokenizer.from_pretrained(path)
    adapter.use_frame_wrapper(tokenizer)  # frame blocks as `VideoQA.from_pretrained` has them
    return adapter, tokenizer, tiny


def _session(adapter: Any, tokenizer: Any, args: argparse.Namespace, frames: int) -> BenchQA:
    """A fresh session (own cache manager) whose host tier holds `frames` frames."""
    page = _kv_bytes_per_token(adapter) * adapter.tokens_per_frame + 64  # 64-byte aligned
    device_blocks = 8 + 2 * args.window + adapter.num_layers * args.retrieve
    cfg = QAConfig(
        system_prompt=SYSTEM,
        window_frames=args.window,
        retrieve_frames=args.retrieve,
        max_new_tokens=args.max_new_tokens,
        device_bytes=device_blocks * page,
        host_bytes=(frames + 8) * page,
        session="bench",
    )
    return BenchQA(adapter, tokenizer, cfg)


def _frames(gen: torch.Generator, n: int, size: tuple[int, int]) -> torch.Tensor:
    """`n` random RGB uint8 frames (content does not change the memory's cost)."""
    return torch.randint(0, 256, (n, *size, 3), dtype=torch.uint8, generator=gen)


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _kv_bytes_per_token(adapter: Any) -> int:
    bits = torch.finfo(adapter.dtype).bits
    return 2 * adapter.num_layers * adapter.num_kv_heads * adapter.head_dim * bits // 8


# ---------------------------------------------------------------------- baseline


@torch.no_grad()
def _reprefill(adapter: Any, embeds: torch.Tensor, n_tokens: int) -> None:
    """The stock language model over every token of the video and the question (one
    ordinary KV cache), then `n_tokens` greedy tokens, as `VideoQA.ask` decodes them."""
    from transformers import DynamicCache

    cache = DynamicCache()
    n = embeds.shape[0]
    hidden = adapter.forward(embeds, adapter.text_positions(n), cache)
    logits = adapter.logits(hidden[-1:])
    for step in range(n_tokens - 1):
        tok = int(logits[-1].argmax())
        hidden = adapter.forward(
            adapter.embed_text([tok]), adapter.text_positions(1) + n + step, cache
        )
        logits = adapter.logits(hidden)


# ---------------------------------------------------------------------- stream


def _points(max_frames: int) -> list[tuple[str, int]]:
    points = [(name, n) for name, n in POINTS if n <= max_frames]
    if not points or points[-1][1] < max_frames:
        points.append((f"{max_frames / 60:.3g} min", max_frames))
    return points


def _device_bytes(qa: VideoQA) -> tuple[int, int]:
    """(device, host) bytes the session's blocks occupy in the cache manager."""
    used = qa.manager.stats()["consumers"]["qa"]
    return used["device"]["bytes"], used["host"]["bytes"] + used["disk"]["bytes"]


def _stream(args: argparse.Namespace, adapter: Any, tokenizer: Any) -> dict[str, Any]:
    """Feed one long stream; at each point time answers against re-prefill."""
    points = _points(args.max_frames)
    qa = _session(adapter, tokenizer, args, points[-1][1])
    gen = torch.Generator().manual_seed(0)
    measure_upto = max(args.baseline_max_frames, points[0][1])  # re-prefill is measured up to
    video: list[torch.Tensor] = []  # visual embeddings: the baseline's input
    fed, feed_s, peak_device = 0, 0.0, 0
    rows: list[dict[str, Any]] = []
    for name, target in points:
        seg_frames, seg_s = fed, feed_s
        while fed < target:
            batch = _frames(gen, min(FEED_BATCH, target - fed), adapter.image_size)
            t0 = time.perf_counter()
            qa.feed(batch)
            feed_s += time.perf_counter() - t0
            fed += batch.shape[0]
            peak_device = max(peak_device, _device_bytes(qa)[0])
            if fed <= measure_upto:  # outside the timed feed
                pixels = adapter.pixels(batch.float() / 255)
                video.append(adapter.encode_frames(pixels).flatten(0, 1))
        # the rate over this segment (since the previous point): constant if feeding is O(1)
        row = {"point": name, "frames": fed, "encode fps": (fed - seg_frames) / (feed_s - seg_s)}
        row.update(
            _measure_point(args, qa, tokenizer, video if fed <= measure_upto else None, rows)
        )
        rows.append(row)
    qa.manager.check_invariants()
    qa.close()
    return {"points": rows, "encode_fps": fed / feed_s, "peak_device_bytes": peak_device}


def _measure_point(
    args: argparse.Namespace,
    qa: VideoQA,
    tokenizer: Any,
    video: list[torch.Tensor] | None,
    earlier: list[dict[str, Any]],
) -> dict[str, Any]:
    """Answer latency, memory and the re-prefill baseline at the stream's current length
    (measured over `video`'s embeddings, or extrapolated from the last measured point)."""
    adapter = qa.adapter
    fed = qa.stats()["frames"]
    n_tokens = max(1, len(qa.ask(QUESTION).token_ids))
    latency = best_of(args.repeats, functools.partial(qa.ask, QUESTION))
    device, host = _device_bytes(qa)
    sys_ids, q_ids = _tokens(tokenizer, SYSTEM), _tokens(tokenizer, QUESTION)
    total_tokens = len(sys_ids) + fed * adapter.tokens_per_frame + len(q_ids)
    row: dict[str, Any] = {
        "answer ms": latency * 1e3,
        "tokens": n_tokens,
        "device KiB": device / 1024,
        "host KiB": host / 1024,
        "re-prefill KV KiB": total_tokens * _kv_bytes_per_token(adapter) / 1024,
    }
    if video is not None:
        embeds = torch.cat([adapter.embed_text(sys_ids), *video, adapter.embed_text(q_ids)])
        repeats = min(args.repeats, 2) if fed > 600 else args.repeats  # seconds each at 1 h
        base = best_of(repeats, functools.partial(_reprefill, adapter, embeds, n_tokens))
        row["re-prefill ms"] = base * 1e3
        row["baseline"] = "measured"
    else:  # linear in tokens: a lower bound (attention is quadratic), so the speedup is too
        last = next(r for r in reversed(earlier) if r["baseline"] == "measured")
        row["re-prefill ms"] = last["re-prefill ms"] * fed / last["frames"]
        row["baseline"] = f"linear from {last['frames']}"
    row["speedup"] = row["re-prefill ms"] / row["answer ms"]
    return row


# ---------------------------------------------------------------------- needle


def _craft_needle(adapter: Any, tokenizer: Any, needle: torch.Tensor, others: torch.Tensor) -> None:
    """Layer 0 scores frames by their visual embedding along (needle - mean of others), and
    the word "needle" gets the needle's embedding: a random model with a known answer
    (the construction of tests/unit/test_qa.py)."""
    attn = adapter.attention_modules()[0]
    with torch.no_grad():
        emb = adapter.encode_frames(adapter.pixels(needle[None].float() / 255))[0].mean(0)
        direction = emb - adapter.encode_frames(adapter.pixels(others.float() / 255)).mean((0, 1))
        direction /= direction.norm()
        for proj in (attn.k_proj, attn.q_proj):
            proj.weight.copy_(direction.expand_as(proj.weight))
            if proj.bias is not None:
                proj.bias.zero_()
        adapter.language_model.layers[0].input_layernorm.weight.fill_(1.0)
        word = tokenizer.convert_tokens_to_ids("needle")
        adapter.language_model.get_input_embeddings().weight[word] = emb


def _needle(
    args: argparse.Namespace, adapter: Any, tokenizer: Any, tiny: bool
) -> list[dict[str, Any]]:
    size = adapter.image_size
    needle = torch.zeros(*size, 3, dtype=torch.uint8)
    needle[..., 0] = 255  # a solid red frame among random ones
    question = "needle" if tiny else "When was the screen completely red?"
    if tiny:
        _craft_needle(
            adapter, tokenizer, needle, _frames(torch.Generator().manual_seed(1), 64, size)
        )
    rng = np.random.default_rng(0)
    rows = []
    for scale in args.needle_scales:
        length = scale * args.window
        hits = {"window-only": 0, "retrieval": 0}
        used = {"window-only": 0, "retrieval": 0}
        for trial in range(args.trials):
            at = int(rng.integers(length))
            frames = _frames(torch.Generator().manual_seed(1000 * scale + trial), length, size)
            frames[at] = needle
            qa = _session(adapter, tokenizer, args, length)
            for s in range(0, length, FEED_BATCH):
                qa.feed(frames[s : s + FEED_BATCH])
            for mode in hits:
                qa.window_only = mode == "window-only"
                answer = qa.ask(question, max_new_tokens=1)
                hits[mode] += float(at) in answer.timestamps
                used[mode] += len(answer.timestamps)
            qa.close()
        n = args.trials
        rows.append(
            {
                "scale": f"{scale}x",
                "frames": length,
                "trials": n,
                "window-only": hits["window-only"] / n,
                "window-only chance": min(1.0, used["window-only"] / n / length),
                "retrieval": hits["retrieval"] / n,
                "retrieval chance": min(1.0, used["retrieval"] / n / length),
            }
        )
    return rows


# ---------------------------------------------------------------------- suite


def _aims(stream: dict[str, Any], needle: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pts = stream["points"]
    first, last = pts[0], pts[-1]
    rows = [
        {"measure": "encode FPS", "value": stream["encode_fps"], "aim": "", "met": ""},
        {
            "measure": f"answer latency {last['point']} / {first['point']}",
            "value": last["answer ms"] / first["answer ms"],
            "aim": "<= 1.2",
            "met": last["answer ms"] / first["answer ms"] <= 1.2,
        },
        {
            "measure": f"speedup vs re-prefill at {last['point']}",
            "value": last["speedup"],
            "aim": ">= 20",
            "met": last["speedup"] >= 20,
        },
        {
            "measure": f"device KiB {last['point']} / {first['point']}",
            "value": last["device KiB"] / max(first["device KiB"], 1e-9),
            "aim": "<= 1 (bounded)",
            "met": last["device KiB"] <= first["device KiB"],
        },
    ]
    if needle:
        far = needle[-1]
        rows += [
            {
                "measure": f"needle retrieval at {far['scale']}",
                "value": far["retrieval"],
                "aim": ">= 0.95",
                "met": far["retrieval"] >= 0.95,
            },
            {
                "measure": f"needle window-only at {far['scale']}",
                "value": far["window-only"],
                "aim": f"~ chance {far['window-only chance']:.3g}",
                "met": far["window-only"] <= 2 * far["window-only chance"] + 0.05,
            },
        ]
    return rows


def bench_qa(args: argparse.Namespace) -> int:
    if args.retrieve is None:
        args.retrieve = args.window  # equal context per layer: same answer cost as window-only
    torch.manual_seed(0)
    adapter, tokenizer, tiny = _load(args.model)
    stream = _stream(args, adapter, tokenizer)
    needle = _needle(args, adapter, tokenizer, tiny) if args.trials > 0 else []
    aims = _aims(stream, needle)
    device = str(adapter.device) + (
        f" ({torch.cuda.get_device_name()})" if adapter.device.type == "cuda" else ""
    )
    what = "a mechanics benchmark of the memory, not answer quality" + (
        " (tiny random model)" if tiny else ""
    )
    title = (
        f"bench qa: {args.model}, {what}; window {args.window}, retrieve {args.retrieve}/layer, "
        f"{adapter.tokens_per_frame} tokens/frame, 1 fps stream fed as fast as possible, {device}; "
        "re-prefill: stock LM over every frame token + question, per question"
    )
    cols = ["point", "frames", "encode fps", "answer ms", "re-prefill ms", "speedup", "baseline"]
    print_table(title, stream["points"], cols)
    print_table(
        "device memory: the session's blocks in the cache manager vs the KV re-prefill holds",
        stream["points"],
        ["point", "frames", "device KiB", "host KiB", "re-prefill KV KiB"],
    )
    if needle:
        print_table(
            f"needle (window {args.window} frames): is the needle among the frames the answer "
            "used? (fraction of trials)",
            needle,
            list(needle[0]),
        )
    print_table("bench qa: aims", aims, ["measure", "value", "aim", "met"])
    write_json(
        args.json,
        {
            "suite": "qa",
            "model": args.model,
            "note": what,
            "device": device,
            "threads": torch.get_num_threads(),
            "window_frames": args.window,
            "retrieve_frames": args.retrieve,
            "tokens_per_frame": adapter.tokens_per_frame,
            "rows": aims,
            "points": stream["points"],
            "peak_device_bytes": stream["peak_device_bytes"],
            "needle": needle,
        },
    )
    return 0
