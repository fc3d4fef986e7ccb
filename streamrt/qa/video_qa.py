"""`VideoQA`: feed a live stream's frames, ask questions about anything seen so far.

    qa = VideoQA.from_pretrained("path/to/video-llm", memory_dir="mem/")
    qa.feed(frame)                       # vision tower -> prefill over [sink | window]
    answer = qa.ask("what color was the circle?")   # any time, from any thread
    qa.close()                           # blocks + index stay in mem/ for the next process

A frame is encoded once, when it arrives; questions never re-encode the video. Per
question (ReKV): score every stored frame, fetch the chosen blocks back to the device,
lay `[sink | chosen frames]` at consecutive positions, prefill the question on top and
decode greedily. The question's own K/V are transient (a few dozen tokens, dropped after
the answer); every frame byte lives in the cache manager.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamrt.cache import CacheError, CacheManager, DiskTierError
from streamrt.cache.process import is_process_cache, join_or_own, process_cache, unique_id
from streamrt.cache.sequence import AttentionPlan
from streamrt.config import CacheConfig, QAConfig
from streamrt.errors import InputError
from streamrt.qa import retrieval
from streamrt.qa.context import PlannedCache, capture
from streamrt.qa.inputs import check_frames, unknown_words
from streamrt.qa.layout import (
    kv_spec,
    lay_out,
    load_qa_model,
    question_ids,
    text_ids,
)
from streamrt.qa.memory import CONSUMER, QAMemory


@dataclass(frozen=True)
class Answer:
    """The answer to one question."""

    text: str
    """Decoded answer (special tokens removed)."""
    timestamps: tuple[float, ...]
    """Timestamps of the frames the answer attended to (union over layers), in time order."""
    latency_s: float
    """Wall time from the call to the last decoded token."""
    token_ids: tuple[int, ...] = ()
    """The generated token ids."""
    unknown_words: tuple[str, ...] = ()
    """Words of the question the tokenizer does not know (mapped to its unknown token):
    the model never saw them, so the answer cannot be about them."""
    notes: tuple[str, ...] = ()
    """How the answer was degraded, if it was (e.g. fewer frames retrieved under memory
    pressure, see `streamrt.runtime.qa`)."""

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the user should know about this answer, one message each (empty: none)."""
        if not self.unknown_words:
            return self.notes
        words = ", ".join(repr(w) for w in self.unknown_words)
        return (
            f"the model does not know the word(s) {words}: the answer ignores them; "
            "rephrase with words it knows",
            *self.notes,
        )


def _default_budgets(cfg: QAConfig) -> bool:
    """No budget of the session's own was asked for (`QAConfig`'s are its defaults)."""
    default = QAConfig()
    return all(
        getattr(cfg, k) == getattr(default, k) for k in ("device_bytes", "host_bytes", "disk_bytes")
    )


class VideoQA:
    """A streaming video QA session on one Video-LLM and one cache manager.

    Args:
        adapter: A `streamrt.models.vlm.VLMAdapter` (see `from_pretrained`).
        tokenizer: The model's tokenizer.
        config: Session settings.
        memory_dir: Directory for the disk tier and the session index (None: in memory only).
        manager: A shared cache manager (a `Runtime`'s). None: the process's
            (`streamrt.cache.process`), unless the session has a `memory_dir` or budgets of
            its own (`QAConfig.device_bytes`, ...): then a manager of its own.
    """

    def __init__(
        self,
        adapter: Any,
        tokenizer: Any,
        config: QAConfig | None = None,
        memory_dir: str | Path | None = None,
        manager: CacheManager | None = None,
    ) -> None:
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.config = config or QAConfig()
        cfg = self.config
        counts = (cfg.window_frames, cfg.retrieve_frames, cfg.group_frames)
        if min(counts) < 1:
            raise InputError(
                "window_frames, retrieve_frames and group_frames must be >= 1, got "
                f"{cfg.window_frames}, {cfg.retrieve_frames}, {cfg.group_frames}"
            )
        if cfg.layer_selection not in ("consensus", "independent"):
            raise InputError(
                f"layer_selection must be 'consensus' or 'independent', got {cfg.layer_selection!r}"
            )
        if not (math.isfinite(cfg.fps) and cfg.fps > 0):
            raise InputError(f"fps must be a finite number > 0, got {cfg.fps}")
        if cfg.max_question_tokens < 1:
            raise InputError(f"max_question_tokens must be >= 1, got {cfg.max_question_tokens}")
        self.memory_dir = _prepare_dir(memory_dir)
        if manager is not None and self.memory_dir is not None and manager.disk is None:
            raise InputError(
                "memory_dir needs a disk tier, but the shared cache manager has none: set its "
                "cache.disk_dir, or let the session make its own manager"
            )

        def own() -> CacheManager:
            return CacheManager(
                CacheConfig(
                    device_bytes=cfg.device_bytes,
                    host_bytes=cfg.host_bytes,
                    disk_bytes=cfg.disk_bytes,
                    disk_dir=None if self.memory_dir is None else str(self.memory_dir / "blocks"),
                    device=str(adapter.device),
                )
            )

        spec, session, consumer = kv_spec(adapter), cfg.session, CONSUMER
        if manager is None and self.memory_dir is None and _default_budgets(cfg):
            manager, consumer = join_or_own(
                process_cache(adapter.device),
                CONSUMER,
                spec,
                own,
                f"a Video-LLM with {spec.block_bytes}-byte KV blocks",
                share=True,
            )
            session = unique_id(f"{cfg.session}-")  # other sessions share the consumer
        self.manager = manager or own()
        self.memory = QAMemory(
            self.manager,
            spec,
            consumer=consumer,
            session=session,
            sink_tokens=self._tokenize(cfg.system_prompt) if cfg.system_prompt else [],
            window_frames=cfg.window_frames,
            fingerprint=adapter.fingerprint(),
            index_dir=self.memory_dir,
        )
        if is_process_cache(self.manager):  # a session dropped unclosed gives its blocks back
            weakref.finalize(self, self.manager.release_later, [self.memory.seq])
        self._lock = threading.RLock()
        self._questions = 0
        self._last_latency: float | None = None
        self._closed = False
        if not self.memory.restored:
            self._prefill_sink()
        records = self.memory.records
        self._committed_below = self.memory.seq.next_index
        self._next_ts = (
            (max(r.timestamp for r in records.values()) + 1 / cfg.fps) if records else 0.0
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        memory_dir: str | Path | None = None,
        *,
        manager: CacheManager | None = None,
        **config: Any,
    ) -> VideoQA:
        """Load a Video-LLM directory (SmolVLM, LLaVA-OneVision, Qwen2-VL) and open a session.

        `path`: None is the embedded tiny model (`assets/tiny-vqa`, found from any working
        directory). `config` keys are `QAConfig` fields; they override the settings in the
        directory's `streamrt.json` (the ones the model was trained for), if it has one.
        With `memory_dir`, a session saved there by an earlier process is restored (same
        model and system prompt required).
        """
        adapter, tokenizer, cfg = load_qa_model(path, **config)
        return cls(adapter, tokenizer, cfg, memory_dir=memory_dir, manager=manager)

    # ------------------------------------------------------------------ public API

    def feed(
        self,
        frames: Any,
        timestamp: float | SequenceABC[float] | None = None,
    ) -> int:
        """Encode one frame `[H, W, 3]` or several `[N, H, W, 3]` (uint8, or float in [0, 1]).

        `timestamp`: seconds of the (first) frame; None continues at `config.fps`.
        Returns the number of frames stored.
        """
        pixels, stamps = self.prepare(frames, timestamp)
        self.store(self.adapter.encode_frames(pixels), stamps)  # one vision batch
        return len(stamps)

    def prepare(
        self, frames: Any, timestamp: float | SequenceABC[float] | None = None
    ) -> tuple[torch.Tensor, list[float]]:
        """`feed`'s first half: checked frames as the model's pixels `[N, ...]` and their
        timestamps (a runtime encodes the pixels of several sessions in one batch)."""
        self._check_open()
        batch = check_frames(frames, self.adapter.image_size, self.config.resize)
        return self.adapter.pixels(batch), self._timestamps(batch.shape[0], timestamp)

    def store(self, embeds: torch.Tensor, stamps: SequenceABC[float]) -> None:
        """`feed`'s second half: encoded frames `[N, tokens, dim]` into the memory."""
        for frame_embeds, t in zip(embeds, stamps):
            with self._lock:
                self._check_open()
                self._feed_one(frame_embeds, t)

    def ask(self, question: str, max_new_tokens: int | None = None) -> Answer:
        """Answer `question` from the frames fed before this call (safe from another thread)."""
        start = time.perf_counter()
        # 1. Check inputs; frames committed after this point are not part of the answer.
        cutoff = self._committed_below
        ids = self._question_ids(question)
        unknown = unknown_words(self.tokenizer, question)
        max_new = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new!r}")
        with self._lock:
            self._check_open()
            # 2-3. Retrieve frames and fetch their blocks back to the device.
            chosen, moved = self._retrieve_and_fetch(ids, cutoff)
            try:
                # 4. Prefill the question on [sink | chosen] and decode greedily.
                tokens = self._generate(ids, [self.memory.layout(c) for c in chosen], max_new)
            finally:
                # 5. Frames fetched for this question leave the device again.
                self.memory.release(moved)
            used = sorted(set().union(*map(set, chosen)))
            stamps = tuple(self.memory.records[i].timestamp for i in used)
            self._questions += 1
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        self._last_latency = time.perf_counter() - start
        return Answer(text, stamps, self._last_latency, tuple(tokens), unknown)

    def check_question(self, question: str) -> None:
        """Raise the `InputError` that `ask(question)` would (empty, not UTF-8, over
        `max_question_tokens`), without asking it: a caller can refuse early."""
        self._question_ids(question)

    @torch.no_grad()
    def question_logits(self, question: str) -> torch.Tensor:
        """Logits `[n, vocab]` over the question's tokens on the retrieved context (for
        exactness tests and evaluation; `ask` decodes from the last row)."""
        ids = self._question_ids(question)
        with self._lock:
            chosen, moved = self._retrieve_and_fetch(ids, self._committed_below)
            try:
                logits, _ = self._prefill(ids, [self.memory.layout(c) for c in chosen])
            finally:
                self.memory.release(moved)
        return logits

    def stats(self) -> dict[str, Any]:
        """Frames stored per tier, questions answered, skipped/missing blocks, cache stats."""
        with self._lock:
            return {
                "frames": self.memory.frame_count(),
                "questions": self._questions,
                "tokens_per_frame": self.adapter.tokens_per_frame,
                "blocks_per_tier": self.memory.tier_counts(),
                "last_latency_s": self._last_latency,
                **self.memory.counters,
                "cache": self.manager.stats(),
            }

    def save(self) -> None:
        """Persist the session now (with `memory_dir`): every frame fed so far gets a copy
        on disk (frames stay where they are) and the index lists them, so a later process
        restores all of them even if this one is killed.

        Raises:
            DiskTierError: The disk is full or failed; the previous save stays intact.
        """
        with self._lock:
            self._check_open()
            self.memory.save_index()

    def close(self) -> None:
        """Save the session (with `memory_dir`) and free its memory. Idempotent.

        Raises:
            DiskTierError: Some frames could not be written (disk full); nothing is freed,
                so `close` can be called again after freeing space.
        """
        with self._lock:
            if not self._closed:
                self.memory.close()  # on a DiskTierError the session stays open: retry
                self._closed = True

    def __enter__(self) -> VideoQA:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ steps

    def _prefill_sink(self) -> None:
        ids = self.memory.sink_tokens
        if not ids:
            return
        tpb = self.memory.spec.tokens_per_block
        blocks = [
            self.memory.allocate(min(tpb, len(ids) - j * tpb)) for j in range(self.memory.num_sink)
        ]
        try:
            empty = AttentionPlan((), (), (), 0)
            text = self.adapter.text_positions(len(ids))
            _, keys, values = self._run(self.adapter.embed_text(ids), self._contexts([empty]), text)
            self.memory.write(blocks, keys, values)
        except BaseException:
            for b in blocks:
                self.memory.discard(b)
            raise

    def _feed_one(self, frame_embeds: torch.Tensor, timestamp: float) -> None:
        index = self.memory.allocate()
        try:
            plan = self.memory.window_plan(before=index)
            _, end = self._layout(plan)
            frame = self.adapter.frame_positions() + end
            _, keys, values = self._run(frame_embeds, self._contexts([plan]), frame)
            self.memory.write([index], keys, values)
            self.memory.commit_frame(index, timestamp, frame_embeds.mean(0))
        except BaseException:
            self.memory.discard(index)
            raise
        self._committed_below = index + 1

    def _retrieve_and_fetch(self, ids: list[int], cutoff: int) -> tuple[list[list[int]], list[int]]:
        """Per-layer chosen frames (time order), fetched; and those this call moved up."""
        frames = self.memory.candidates(cutoff)
        if not frames and cutoff > self.memory.num_sink:
            raise InputError(
                "every frame fed so far was dropped (the host and disk tiers had no room): "
                "raise host_bytes or give the session a memory_dir"
            )
        if not frames:
            raise InputError("no frames have been fed yet: feed at least one frame before asking")
        moved: list[int] = []
        while True:
            chosen = self._select(ids, frames, cutoff)
            union = sorted(set().union(*map(set, chosen)))
            up, lost = self.memory.fetch(union)
            moved += up
            if not lost:
                return chosen, moved
            frames = [f for f in frames if f not in lost]
            if not frames:
                self.memory.release(moved)
                raise CacheError(
                    "every stored frame failed its checksum or is missing on disk: nothing "
                    "left to answer from; feed new frames or use a new memory_dir"
                )

    def _select(self, ids: list[int], frames: list[int], cutoff: int) -> list[list[int]]:
        cfg, n_layers = self.config, self.adapter.num_layers
        if cfg.retrieval == "external":
            q = self.adapter.embed_text(ids).float().mean(0).cpu()
            scores = retrieval.external_scores(q, self.memory.embeds.take(frames))
        else:
            plan = self.memory.window_plan(before=cutoff)
            _, end = self._layout(plan)
            with capture(self.adapter.attention_modules(), ("q_proj",)) as got:
                self.adapter.forward(
                    self.adapter.embed_text(ids),
                    self.adapter.text_positions(len(ids)) + end,
                    PlannedCache(self._contexts([plan])),
                )
            q = retrieval.question_vectors(
                got["q_proj"], self.adapter.num_kv_heads, self.adapter.head_dim
            )
            scores = retrieval.internal_scores(q.cpu(), self.memory.summaries.take(frames))
            if not cfg.per_layer:
                scores = scores.sum(0, keepdim=True)
            elif cfg.layer_selection == "consensus" and n_layers > 1:
                scores = retrieval.consensus(scores, cfg.retrieve_frames, cfg.group_frames)
        picks = retrieval.select(scores, cfg.retrieve_frames, cfg.group_frames)
        if len(picks) == 1:
            picks = picks * n_layers
        return [[frames[p] for p in row] for row in picks]

    def _generate(self, ids: list[int], plans: list[AttentionPlan], max_new: int) -> list[int]:
        logits, cache = self._prefill(ids, plans)
        pos = self._layout(plans[0])[1] + len(ids)
        eos = self.tokenizer.eos_token_id
        tokens: list[int] = []
        while True:
            tok = int(logits[-1].argmax())
            if tok == eos:
                break
            tokens.append(tok)
            if len(tokens) == max_new:
                break
            hidden = self.adapter.forward(
                self.adapter.embed_text([tok]), self.adapter.text_positions(1) + pos, cache
            )
            logits = self.adapter.logits(hidden)
            pos += 1
        return tokens

    def _prefill(
        self, ids: list[int], plans: list[AttentionPlan]
    ) -> tuple[torch.Tensor, PlannedCache]:
        cache = PlannedCache(self._contexts(plans))
        text = self.adapter.text_positions(len(ids)) + self._layout(plans[0])[1]
        hidden = self.adapter.forward(self.adapter.embed_text(ids), text, cache)
        return self.adapter.logits(hidden), cache

    def _run(
        self,
        embeds: torch.Tensor,
        contexts: list[tuple[torch.Tensor, torch.Tensor]],
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Prefill `embeds` on `contexts`; return hidden states and the new tokens' pre-RoPE
        K and V per layer (`[n, H_kv, D]`), ready for the cache manager."""
        a = self.adapter
        with capture(a.attention_modules()) as got:
            hidden = a.forward(embeds, positions, PlannedCache(contexts))
        shape = (embeds.shape[0], a.num_kv_heads, a.head_dim)
        keys = [k.reshape(shape) for k in got["k_proj"]]
        values = [v.reshape(shape) for v in got["v_proj"]]
        return hidden, keys, values

    def _contexts(self, plans: list[AttentionPlan]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the plan's K (rotated at the plan's positions) and V, `[1, H, P, D]`.
        One plan is used for every layer."""
        a = self.adapter
        if len(plans) == 1:
            plans = plans * a.num_layers
        out = []
        for layer, plan in enumerate(plans):
            if not plan.indices:
                empty = torch.zeros(
                    1, a.num_kv_heads, 0, a.head_dim, dtype=a.dtype, device=a.device
                )
                out.append((empty, empty))
                continue
            k, v = self.memory.gather(layer, plan)
            positions, _ = self._layout(plan)
            out.append((a.rotate(k, positions), v.to(a.dtype).transpose(0, 1)[None]))
        return out

    def _layout(self, plan: AttentionPlan) -> tuple[torch.Tensor, int]:
        """RoPE positions of the plan's blocks laid one after another from 0, and the first
        free position after them (see `lay_out`)."""
        sink = self.memory.num_sink
        return lay_out(
            self.adapter,
            [("text" if i < sink else "frame", n) for i, n in zip(plan.indices, plan.lengths)],
        )

    # ------------------------------------------------------------------ input checks

    def _tokenize(self, text: str) -> list[int]:
        return text_ids(self.tokenizer, text)

    def _question_ids(self, question: Any) -> list[int]:
        limit = self.config.max_question_tokens
        # Cheap bound first, so a megabyte of text is not even tokenized (no tokenizer
        # here makes a token out of more than a few dozen characters).
        if isinstance(question, str) and len(question) > 64 * limit:
            raise InputError(
                f"the question is {len(question)} characters long, over the limit of "
                f"{limit} tokens (max_question_tokens): ask a shorter question"
            )
        ids = question_ids(self.tokenizer, self.config, question)
        if len(ids) > limit:
            raise InputError(
                f"the question is {len(ids)} tokens long, over the limit of {limit} tokens "
                "(max_question_tokens): ask a shorter question"
            )
        return ids

    def _timestamps(self, n: int, timestamp: Any) -> list[float]:
        step = 1.0 / self.config.fps
        try:
            if timestamp is None:
                stamps = [self._next_ts + k * step for k in range(n)]
            elif isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool):
                stamps = [float(timestamp) + k * step for k in range(n)]
            else:
                stamps = [float(t) for t in timestamp]
        except (TypeError, ValueError):
            raise InputError(
                f"timestamp must be seconds (a number or one per frame), got {timestamp!r}"
            ) from None
        if len(stamps) != n:
            raise InputError(f"got {len(stamps)} timestamps for {n} frames: give one per frame")
        if not all(math.isfinite(t) for t in stamps):
            raise InputError(f"timestamps must be finite numbers of seconds, got {stamps}")
        self._next_ts = stamps[-1] + step
        return stamps

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this VideoQA session is closed; open a new one")


def _prepare_dir(memory_dir: str | Path | None) -> Path | None:
    if memory_dir is None:
        return None
    path = Path(memory_dir)
    if path.exists() and not path.is_dir():
        raise DiskTierError(
            f"memory_dir {path} is a file, not a directory: choose another memory_dir"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe.{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DiskTierError(
            f"memory_dir {path} is not a writable directory ({exc}): choose another memory_dir"
        ) from None
    return path
