"""The QA memory: a session's frames as blocks in the one `CacheManager`, plus its index.

    logical blocks:  [ sink 0..S-1 | frame S | frame S+1 | ... ]       one frame = one block
    device:          [ sink | last W frames ]      (SinkWindowPolicy: a ring of W slots)
    host / disk:     every older frame, moved down by the manager under its budgets

Keys are stored before RoPE, so any subset of blocks can be laid at consecutive positions
(`contiguous_plan`). Beside each frame block the memory keeps a small record (timestamp,
summary key `[L, H_kv * D]`, mean visual embedding) used by retrieval; with a disk tier the
records are written to `<memory_dir>/<session>.index.pt` (temp file + rename) on `save_index`
and `close`, and a later process restores the blocks and records together.

Invariant: `records` holds exactly the servable frame blocks of the sequence's table
(blocks dropped by the manager or found corrupt are pruned from it before use); the
table may also hold `unindexed` disk blocks a reopen found without a record, which are
kept on disk and never served.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamrt.cache import (
    DEVICE,
    DISK,
    HOST,
    CacheError,
    CacheManager,
    CorruptBlockError,
    DiskTierError,
    KVSpec,
    OutOfBlocksError,
    SpecMismatchError,
)
from streamrt.cache.disk_store import remove_stale_temp_files, write_file_atomically
from streamrt.cache.policies import SinkWindowPolicy, contiguous_plan
from streamrt.cache.sequence import AttentionPlan

INDEX_FORMAT = 1
CONSUMER = "qa"


@dataclass(frozen=True)
class FrameRecord:
    """What retrieval knows about one stored frame (its K/V live in the cache manager)."""

    timestamp: float
    summary: torch.Tensor
    """Per layer, the mean pre-RoPE key over the frame's tokens, heads concatenated."""
    embed: torch.Tensor
    """Mean of the frame's visual token embeddings (external retrieval)."""


class RowBank:
    """Rows of equal shape in one growing tensor, found by key.

    Retrieval scores every stored frame per question; stacking thousands of small tensors
    each time would make answer latency grow with the stream. Rows of removed keys stay
    unreferenced (as many as the session ever stored, like the index itself).
    """

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.rows: dict[int, int] = {}
        self.size = 0

    def add(self, key: int, row: torch.Tensor) -> None:
        if self.data is None:
            self.data = torch.empty((64, *row.shape), dtype=row.dtype)
        elif self.size == self.data.shape[0]:
            self.data = torch.cat([self.data, torch.empty_like(self.data)])
        self.data[self.size] = row
        self.rows[key] = self.size
        self.size += 1

    def take(self, keys: list[int]) -> torch.Tensor:
        """Rows of `keys`, stacked in that order."""
        assert self.data is not None
        return self.data.index_select(
            0, torch.tensor([self.rows[k] for k in keys], dtype=torch.long)
        )


class QAMemory:
    """A session's block table, window and frame index on a `CacheManager`.

    Args:
        manager: The process's cache manager (its disk tier, if any, persists the session).
        spec: KV layout of one frame block (tokens_per_block = tokens per frame).
        session: Sequence id; also the name of the index file.
        sink_tokens: Token ids of the system prompt (the sink); fixes the sink's size.
        window_frames: Frames a new frame attends to (itself included) after the sink.
        fingerprint: Model facts a restored memory must match.
        index_dir: Where the index lives (None: not persistent).
        consumer: The manager's consumer of the session (registered if new).
    """

    def __init__(
        self,
        manager: CacheManager,
        spec: KVSpec,
        *,
        session: str,
        sink_tokens: list[int],
        window_frames: int,
        fingerprint: dict[str, Any],
        index_dir: Path | None,
        consumer: str = CONSUMER,
    ) -> None:
        self.manager = manager
        self.spec = spec
        self.sink_tokens = list(sink_tokens)
        self.num_sink = -(-len(sink_tokens) // spec.tokens_per_block)
        self.fingerprint = {**fingerprint, "sink_tokens": self.sink_tokens}
        name = consumer
        consumer = manager.consumers.get(name)
        if consumer is None:
            consumer = manager.register(name, spec)
        else:
            spec.check_compatible(consumer.spec, f"consumer {name!r} already registered")
        self.index_path = None if index_dir is None else index_dir / f"{session}.index.pt"
        persistent = self.index_path is not None and manager.disk is not None
        policy = SinkWindowPolicy(sink_blocks=self.num_sink, window_blocks=window_frames)
        try:
            self.seq = manager.open_sequence(consumer, policy, seq_id=session, restore=persistent)
        except SpecMismatchError as exc:
            where = index_dir if index_dir is not None else manager.disk.root
            raise SpecMismatchError(
                f"the memory in {where} was written by another model ({exc}): open it with "
                f"that model, choose another memory_dir, or delete {where}"
            ) from None
        self.records: dict[int, FrameRecord] = {}
        self.summaries = RowBank()
        self.embeds = RowBank()
        self.counters = {"corrupt_skipped": 0, "missing_on_restore": 0, "lost_on_close": 0}
        self.unindexed: list[int] = []
        """Restored disk blocks the index does not list: kept, never served."""
        self.restored = False
        if self.index_path is not None:
            remove_stale_temp_files(self.index_path.parent, self.index_path.name)
        if self.seq.table:
            self._reconcile(window_frames)

    # ------------------------------------------------------------------ writing

    @property
    def has_sink(self) -> bool:
        return all(i in self.seq.table for i in range(self.num_sink))

    def allocate(self, num_tokens: int | None = None) -> int:
        """A new device block at the end (the ring moves the oldest window frame down)."""
        return self.seq.append(num_tokens)

    def discard(self, index: int) -> None:
        """Give back a block whose writing failed, so no garbage is ever served."""
        if index in self.seq.table:
            self.seq.free(index)
        self.records.pop(index, None)

    def write(
        self, indices: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]
    ) -> None:
        """Write pre-RoPE K and V of every layer (`[n_tokens, H, D]` each) into `indices`,
        padding the last block with zeros (its valid length is the block's `num_tokens`)."""
        total = len(indices) * self.spec.tokens_per_block
        for layer, (k, v) in enumerate(zip(keys, values)):
            pad = total - k.shape[0]
            if pad:
                k = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad))
                v = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad))
            self.seq.write_layer(indices, layer, k, v)

    def commit_frame(self, index: int, timestamp: float, embed: torch.Tensor) -> None:
        """Record a written frame block (its summary key is computed from the stored keys)."""
        summary = self.manager.summarize(self.seq, index)
        self._record(index, FrameRecord(float(timestamp), summary, embed.float().cpu()))

    def _record(self, index: int, record: FrameRecord) -> None:
        self.records[index] = record
        self.summaries.add(index, record.summary)
        self.embeds.add(index, record.embed)

    # ------------------------------------------------------------------ reading

    def window_plan(self, before: int) -> AttentionPlan:
        """Sink + device-resident frames older than block `before`, laid from position 0."""
        return contiguous_plan(self.seq, [i for i in self.seq.indices(DEVICE) if i < before])

    def layout(self, frames: list[int]) -> AttentionPlan:
        """Sink + `frames` (time order) at consecutive positions from 0."""
        return contiguous_plan(self.seq, [*range(self.num_sink), *frames])

    def gather(self, layer: int, plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE K and V `[tokens, H, D]` of `layer` over the plan's (device) blocks."""
        return self.seq.gather(layer, plan)

    def candidates(self, below: int) -> list[int]:
        """Frame blocks with index < `below` that can be served, in time order."""
        self._prune()
        return [i for i in self.records if i < below]

    def fetch(self, frames: list[int]) -> tuple[list[int], list[int]]:
        """Bring `frames` to the device. Returns (moved up by this call, lost as corrupt).

        A block failing its checksum is dropped by the manager, warned about and counted
        here; the others are still fetched.
        """
        moved = [i for i in frames if self.seq.table[i].tier != DEVICE]
        lost: list[int] = []
        pending = list(frames)
        while pending:
            try:
                self.manager.fetch(self.seq, pending)
                break
            except OutOfBlocksError as exc:
                self.release([i for i in moved if i not in lost])
                raise OutOfBlocksError(
                    f"cannot bring {len(frames)} frame(s) to the device for this question: {exc}. "
                    "Raise device_bytes or lower retrieve_frames / window_frames"
                ) from None
            except CorruptBlockError as exc:
                gone = [i for i in pending if i not in self.seq.table]
                lost += gone
                for i in gone:
                    self.records.pop(i, None)
                self.counters["corrupt_skipped"] += len(gone)
                warnings.warn(f"skipped corrupt frame block(s) {gone}: {exc}", stacklevel=3)
                pending = [i for i in pending if i in self.seq.table]
        return [i for i in moved if i not in lost], lost

    def release(self, frames: list[int]) -> None:
        """Move frames fetched for a question back to the host (device memory stays bounded)."""
        for i in frames:  # one at a time, so each may push older host blocks on to disk
            if i in self.seq.table and self.seq.table[i].tier == DEVICE:
                self.manager.offload(self.seq, i, HOST)

    def frame_count(self) -> int:
        self._prune()
        return len(self.records)

    def tier_counts(self) -> dict[str, int]:
        return dict(self.seq.counts)

    # ------------------------------------------------------------------ persistence

    def save_index(self) -> None:
        """Give every frame a copy on disk, then write the frame index (atomically).

        Blocks on the device or the host stay where they are; each gets a clean copy in
        the disk tier (written once: later saves skip it), so an index saved before a
        crash finds every frame it lists.

        Raises:
            DiskTierError: A block or the index could not be written (disk full, I/O
                error); the previous index stays in place and every block it lists is kept.
        """
        if self.index_path is None or self.manager.disk is None:
            return
        table = self.seq.table
        copies = [i for i, b in self.seq.items() if b.tier != DISK and b.disk_key is None]
        for i in copies:
            tier = table[i].tier
            self.manager.offload(self.seq, i, DISK)
            self.manager.fetch(self.seq, i, tier)
        self._write_index()

    def _write_index(self) -> None:
        """Write the records of every frame in the table (temp file + rename)."""
        self._prune()
        idx = sorted(self.records)
        recs = [self.records[i] for i in idx]
        hidden = recs[0].embed.shape[0] if recs else 0
        data = {
            "format": INDEX_FORMAT,
            "fingerprint": {k: v for k, v in self.fingerprint.items() if k != "sink_tokens"},
            "sink_tokens": torch.tensor(self.sink_tokens, dtype=torch.long),
            "index": torch.tensor(idx, dtype=torch.long),
            "timestamp": torch.tensor([r.timestamp for r in recs], dtype=torch.float64),
            "summary": torch.stack([r.summary for r in recs]) if recs else torch.zeros(0),
            "embed": torch.stack([r.embed for r in recs]) if recs else torch.zeros(0, hidden),
        }
        buf = io.BytesIO()
        torch.save(data, buf)
        write_file_atomically(self.index_path, buf.getbuffer())

    def close(self) -> None:
        """Persist everything to the disk tier (if any) and free the sequence's memory.

        The index is written first (it is small and lists every frame), then the blocks
        not yet on disk: a block that cannot be written is reported missing on reopen,
        while the others stay servable.

        Frames over the disk budget (`disk_bytes`) are dropped with a warning and counted
        in `lost_on_close`, as frames dropped during the stream.

        Raises:
            DiskTierError: Something could not be written (disk full, I/O error). The
                sequence stays open and in memory, so `close` can be called again once
                there is room; what was written is kept.
        """
        if self.seq.closed:
            return
        if self.index_path is None or self.manager.disk is None:
            self.manager.close_sequence(self.seq)
            return
        self._write_index()
        failed: list[tuple[int, CacheError]] = []
        over_budget: list[int] = []
        for i, block in self.seq.items():
            if block.tier == DISK:
                continue
            try:
                self.manager.offload(self.seq, i, DISK)
            except CacheError as exc:
                # The disk failed (full, I/O error): worth a retry. A budget or quota the
                # user set is a choice: those frames are dropped, as during the stream.
                if isinstance(exc.__cause__, OSError):
                    failed.append((i, exc))
                else:
                    over_budget.append(i)
                    warnings.warn(f"frame block {i} not saved to disk: {exc}", stacklevel=3)
        if over_budget and not failed:
            self.counters["lost_on_close"] += len(over_budget)
            for i in over_budget:
                self.seq.free(i)
            self._write_index()
        if failed:
            raise DiskTierError(
                f"{len(failed)} frame block(s) of {self.index_path.parent} could not be saved "
                f"({failed[0][1]}); they are still in memory: free space there and close "
                "again, or open the session with another memory_dir"
            )
        self.manager.close_sequence(self.seq, keep_disk=True)

    def _reconcile(self, window_frames: int) -> None:
        """Match restored disk blocks with the saved index; bring sink + window back.

        Blocks the index does not list (written after the last save) stay on disk unserved,
        and blocks without a readable index refuse the reopen: it never deletes a block.
        """
        data = self._load_index()
        if data is None:
            raise CacheError(
                f"the memory in {self.index_path.parent} holds {len(self.seq.table)} block(s) "
                f"of session {self.seq.seq_id!r} but no readable index {self.index_path.name} "
                "(the session was never saved): its frames cannot be served. Choose another "
                "memory_dir or session, or delete that directory to start afresh"
            )
        saved_sink = data["sink_tokens"].tolist()
        if saved_sink != self.sink_tokens or not self.has_sink:
            raise CacheError(
                f"the memory in {self.index_path.parent} was written with another system prompt "
                "or lost its sink blocks: open it with the same system_prompt, or use a new memory_dir"
            )
        for j, i in enumerate(data["index"].tolist()):
            if i not in self.seq.table:
                self.counters["missing_on_restore"] += 1
                continue
            self._record(
                i, FrameRecord(float(data["timestamp"][j]), data["summary"][j], data["embed"][j])
            )
        self.unindexed = [i for i in self.seq.table if i >= self.num_sink and i not in self.records]
        if self.unindexed:
            warnings.warn(
                f"{len(self.unindexed)} frame block(s) in {self.manager.disk.root} were written "
                "after the index was last saved: they are kept on disk but not served",
                stacklevel=3,
            )
        if self.counters["missing_on_restore"]:
            warnings.warn(
                f"{self.counters['missing_on_restore']} indexed frame block(s) are missing or "
                "corrupt on disk and will not be served",
                stacklevel=3,
            )
        sink = list(range(self.num_sink))
        if sink:
            _, lost = self.fetch(sink)
            if lost:
                raise CacheError(
                    "a sink block of the restored memory is corrupt: use a new memory_dir"
                )
        window = sorted(self.records)[-(window_frames - 1) :] if window_frames > 1 else []
        self.fetch(window)
        self.restored = True

    def _load_index(self) -> dict[str, Any] | None:
        if self.index_path is None or not self.index_path.is_file():
            return None
        try:
            with warnings.catch_warnings():  # torch's own advice (weights_only=False) is wrong here
                warnings.simplefilter("ignore")
                data = torch.load(self.index_path, weights_only=True)
        except Exception as exc:  # a foreign or damaged file: refuse, delete nothing
            raise CacheError(
                f"cannot read the QA index {self.index_path} ({type(exc).__name__}: it is "
                "damaged or not a streamrt index): choose another memory_dir, or delete "
                f"{self.index_path.parent} to start afresh"
            ) from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CacheError(
                f"{self.index_path}: unknown index format {got!r}: choose another memory_dir, "
                f"or delete {self.index_path.parent} to start afresh"
            )
        saved = data["fingerprint"]
        ours = {k: v for k, v in self.fingerprint.items() if k != "sink_tokens"}
        if saved != ours:
            diffs = [
                f"{k}: saved {saved.get(k)!r}, model {ours.get(k)!r}"
                for k in ours
                if saved.get(k) != ours[k]
            ]
            raise SpecMismatchError(
                f"the memory in {self.index_path.parent} was written by another model ("
                + "; ".join(diffs)
                + f"): open it with that model, choose another memory_dir, or delete "
                f"{self.index_path.parent}"
            )
        return data

    def _prune(self) -> None:
        for i in [i for i in self.records if i not in self.seq.table]:
            del self.records[i]
