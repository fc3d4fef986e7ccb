"""Disk tier of the KV-cache manager: one crash-safe file per KV block.

Each block is one ``<root>/<key>.kv`` file in the format of
`streamrt.cache.disk_format` (JSON header with a crc32, xxh3-checksummed payload).

Invariants that make the store crash-safe:

* A ``<key>.kv`` name only appears through ``os.replace`` of a fully written, fsynced
  temp file, so a crash leaves the old block or the new one, never a torn one. Torn
  writes live only in ``.<key>.<id>.tmp`` files, which opening the store deletes.
* The index holds only blocks whose header checked out and whose file size equals
  ``16 + hlen + nbytes``; ``get`` and ``verify`` re-check the payload checksum, so a block
  that rotted on disk is never served. Bad files are kept, renamed ``*.corrupt``.
* ``used_bytes`` always equals the sum of ``nbytes`` over the index.

One process owns a root at a time: opening a store deletes the temp files of any
writer still running in the same directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import threading
import uuid
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamrt.cache.disk_format import (
    KEY_RE,
    MAGIC,
    PREFIX,
    BadBlock,
    DiskEntry,
    encode_header,
    payload_checksum,
    read_entry,
    read_payload,
)
from streamrt.cache.errors import CorruptBlockError, DiskTierError
from streamrt.errors import InputError

_BLOCK_SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"
_CORRUPT_SUFFIX = ".corrupt"
_STAT_NAMES = [
    "writes",
    "reads",
    "bytes_written",
    "bytes_read",
    "corrupt",
    "discarded_tmp",
    "write_errors",
    "missing",
]


class DiskStore:
    """Stores KV blocks as files under ``root`` and finds them again after a restart.

    Args:
        root: Directory for the block files; created if missing.
        budget_bytes: Upper bound on ``used_bytes`` (payload bytes); ``None`` for no bound.

    Raises:
        DiskTierError: ``root`` cannot be created or is not a writable directory.
    """

    def __init__(self, root: str | os.PathLike[str], budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise InputError(f"budget_bytes must be >= 0 or None, got {budget_bytes}")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._index: dict[str, DiskEntry] = {}
        self._used = 0
        # Payload bytes of writes in flight, so concurrent puts cannot overrun the budget.
        self._pending = 0
        self._stats = dict.fromkeys(_STAT_NAMES, 0)
        _prepare_root(self.root)
        self._scan()

    @property
    def used_bytes(self) -> int:
        """Sum of payload bytes over the indexed blocks."""
        return self._used

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def keys(self) -> list[str]:
        """Keys of all servable blocks, as a snapshot."""
        with self._lock:
            return list(self._index)

    def entry(self, key: str) -> DiskEntry:
        """Metadata of block ``key`` without reading its payload.

        Raises:
            KeyError: No block is stored under ``key``.
        """
        with self._lock:
            return self._lookup(key)

    def stats(self) -> dict[str, int]:
        """Counters; ``files`` and ``bytes`` (payload, as ``used_bytes``) describe the index."""
        with self._lock:
            return {"files": len(self._index), "bytes": self._used, **self._stats}

    def put(self, key: str, tensor: torch.Tensor, meta: dict[str, Any] | None = None) -> DiskEntry:
        """Writes ``tensor`` under ``key`` atomically, replacing any block already there.

        Args:
            key: Block key, ``[A-Za-z0-9][A-Za-z0-9._-]{0,200}``.
            tensor: Tensor of any dtype and device; non-CPU tensors are copied to the CPU.
            meta: JSON-compatible metadata stored with the block.

        Returns:
            The new block's entry.

        Raises:
            ValueError: ``key`` is invalid or ``meta`` is not JSON-compatible.
            DiskTierError: The budget would be exceeded, or the write failed (disk full,
                I/O error); the store then still serves the previous block under ``key``.
        """
        _check_key(key)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"block {key!r} must be a torch.Tensor, got {type(tensor).__name__}")
        payload = _tensor_bytes(tensor)
        entry = DiskEntry(
            key=key,
            dtype=tensor.dtype,
            shape=tuple(tensor.shape),
            nbytes=payload.nbytes,
            checksum=payload_checksum(payload),
            meta=dict(meta or {}),
            path=self.root / f"{key}{_BLOCK_SUFFIX}",
        )
        header = encode_header(entry)
        # Hand back meta as a reopened store will see it (tuples become lists).
        entry = dataclasses.replace(entry, meta=json.loads(header)["meta"])
        self._reserve(entry)
        try:
            self._write_block(entry, header, payload)
        finally:
            with self._lock:
                self._pending -= entry.nbytes
        return entry

    def delete(self, key: str) -> None:
        """Removes block ``key`` from the index and the disk.

        Raises:
            KeyError: No block is stored under ``key``.
        """
        with self._lock:
            entry = self._lookup(key)
            self._drop(entry)
            # A crash before the unlink reaches the disk only resurrects a valid block.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)

    def _reserve(self, entry: DiskEntry) -> None:
        """Checks the budget and books the write's bytes as pending."""
        with self._lock:
            old = self._index.get(entry.key)
            freed = old.nbytes if old is not None else 0
            after = self._used - freed + self._pending + entry.nbytes
            if self.budget_bytes is not None and after > self.budget_bytes:
                raise DiskTierError(
                    f"writing block {entry.key!r} ({entry.nbytes} bytes) to {self.root} would "
                    f"use {after} bytes, over the disk tier budget of {self.budget_bytes} "
                    f"bytes; delete blocks or raise budget_bytes"
                )
            self._pending += entry.nbytes

    def _write_block(self, entry: DiskEntry, header: bytes, payload: np.ndarray) -> None:
        """Temp file -> write -> fsync -> replace -> fsync dir; see the module invariants."""
        tmp = self.root / f".{entry.key}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
        prefix = PREFIX.pack(MAGIC, len(header), zlib.crc32(header))

        def publish() -> None:
            # Replace and index update under one lock, so the index never names a
            # file another put has already replaced.
            with self._lock:
                os.replace(tmp, entry.path)
                old = self._index.get(entry.key)
                if old is not None:
                    self._drop(old)
                self._add(entry)
                self._stats["writes"] += 1
                self._stats["bytes_written"] += entry.nbytes

        try:  # the header is small; the payload is never copied
            _write_via_temp(tmp, (prefix + header, payload), publish)
        except _WriteFailed as failed:
            with self._lock:
                self._stats["write_errors"] += 1
            raise DiskTierError(
                _write_error_message(self.root, entry, failed.stage, failed.error)
            ) from failed.error
        try:
            _fsync_dir(self.root)
        except OSError as exc:
            # The block is complete and served; only its survival of a power loss is in doubt.
            with self._lock:
                self._stats["write_errors"] += 1
            warnings.warn(f"disk tier: fsync of {self.root} failed: {exc}", stacklevel=3)

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Reads block ``key`` and checks its payload checksum.

        Args:
            key: Block key.
            out: Optional contiguous CPU tensor (pinned is fine) of the stored dtype and
                shape to read into; its contents are unspecified if the read fails.

        Returns:
            A CPU tensor with the stored dtype and shape (``out`` when given).

        Raises:
            KeyError: No block is stored under ``key``.
            ValueError: ``out`` does not match the stored block.
            CorruptBlockError: The file failed a check (the block is dropped from the
                index and its file renamed ``*.corrupt``) or was removed outside the store
                (the block is dropped from the index).
            DiskTierError: The file could not be read.
        """
        with self._lock:
            entry = self._lookup(key)
            # Opened under the lock: a concurrent put replaces the name, not this inode.
            f = self._open_block(entry)
            if f is None:
                raise self._forget_missing(entry)
        with f:
            if out is None:
                out = torch.empty(entry.shape, dtype=entry.dtype)
            else:
                _check_out(out, entry)
            try:
                problem = read_payload(f, entry, _byte_view(out))
            except OSError as exc:
                raise DiskTierError(
                    f"reading block {key!r} from {entry.path} failed: {exc.strerror or exc}"
                ) from exc
        if problem is not None:
            raise self._quarantine(entry, problem)
        with self._lock:
            self._stats["reads"] += 1
            self._stats["bytes_read"] += entry.nbytes
        return out

    def verify(self) -> list[str]:
        """Re-reads every block and checks its checksum.

        Returns:
            Keys of the blocks found corrupt or missing; each is dropped (a corrupt
            file renamed ``*.corrupt``), as in ``get``.
        """
        # One buffer, grown to the largest block, serves every read.
        buf = bytearray()
        bad = []
        for key in self.keys():
            with self._lock:
                entry = self._index.get(key)
                if entry is None:
                    continue
                f = self._open_block(entry)
                if f is None:
                    self._forget_missing(entry)
                    bad.append(key)
                    continue
            if len(buf) < entry.nbytes:
                buf = bytearray(entry.nbytes)
            with f:
                problem = read_payload(f, entry, memoryview(buf)[: entry.nbytes])
            if problem is not None:
                self._quarantine(entry, problem)
                bad.append(key)
        return bad

    def _open_block(self, entry: DiskEntry):
        """The block's file opened for reading, or None if it was removed from the disk."""
        try:
            return open(entry.path, "rb", buffering=0)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DiskTierError(
                f"cannot open block {entry.key!r} at {entry.path}: {exc.strerror or exc}; "
                "fix the file's permissions or the volume"
            ) from exc

    def _forget_missing(self, entry: DiskEntry) -> CorruptBlockError:
        """Drops a block whose file was removed outside the store (call under the lock);
        reported like a corrupt block, since its data is gone the same way."""
        self._drop(entry)
        self._stats["missing"] += 1
        warnings.warn(
            f"disk tier: {entry.path} was removed outside the store; block {entry.key!r} "
            "is no longer served",
            RuntimeWarning,
            stacklevel=4,
        )
        return CorruptBlockError(
            f"block {entry.key!r} is missing: its file {entry.path} was removed outside the "
            "store; it was dropped from the disk tier; recompute it"
        )

    def _scan(self) -> None:
        """Drops temp files of interrupted writes and indexes every block whose header checks out."""
        with os.scandir(self.root) as it:
            names = sorted(e.name for e in it if e.is_file(follow_symlinks=False))
        for name in names:
            path = self.root / name
            if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                _unlink_quietly(path)
                self._stats["discarded_tmp"] += 1
            elif name.endswith(_BLOCK_SUFFIX):
                try:
                    self._add(read_entry(path, name[: -len(_BLOCK_SUFFIX)]))
                except BadBlock as why:
                    self._quarantine_file(path, str(why))

    def _quarantine(self, entry: DiskEntry, problem: str) -> CorruptBlockError:
        """Drops a block that failed a read check and returns the error to raise."""
        with self._lock:
            # Another put may have replaced the file since we opened it; then the
            # name already holds a good block and must not be renamed.
            if self._index.get(entry.key) is entry:
                self._drop(entry)
                self._quarantine_file(entry.path, problem)
            else:
                self._stats["corrupt"] += 1
        return CorruptBlockError(
            f"block {entry.key!r} in {entry.path} is corrupt ({problem}); it was dropped "
            f"from the disk tier and kept as {entry.path}{_CORRUPT_SUFFIX}; recompute it"
        )

    def _quarantine_file(self, path: Path, problem: str) -> None:
        self._stats["corrupt"] += 1
        dest = path.with_name(path.name + _CORRUPT_SUFFIX)
        try:
            os.replace(path, dest)
        except OSError:
            dest = path
        msg = f"disk tier: {path} is corrupt ({problem}); not served, kept as {dest}"
        warnings.warn(msg, RuntimeWarning, stacklevel=4)

    def _lookup(self, key: str) -> DiskEntry:
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"no block {key!r} in the disk tier at {self.root}") from None

    def _add(self, entry: DiskEntry) -> None:
        self._index[entry.key] = entry
        self._used += entry.nbytes

    def _drop(self, entry: DiskEntry) -> None:
        del self._index[entry.key]
        self._used -= entry.nbytes


def _prepare_root(root: Path) -> None:
    """Creates ``root`` and proves a file can be created in it."""
    fix = "pass a directory this process can create files in, or fix its permissions"
    try:
        # Raises FileExistsError when root, or a parent, is not a directory.
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiskTierError(
            f"cannot create the disk tier directory {root}: {exc.strerror or exc}; {fix}"
        ) from exc
    # os.access says yes to root on a read-only bind mount and on 0o500 dirs; a
    # real file creation is the only reliable answer.
    probe = root / f".probe.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as exc:
        raise DiskTierError(
            f"disk tier root {root} is not writable ({exc.strerror or exc}); {fix}"
        ) from exc
    _unlink_quietly(probe)


def write_file_atomically(path: Path, data: bytes | memoryview) -> None:
    """Writes ``data`` to ``path`` crash-safely (temp file, fsync, rename, fsync of the dir).

    A crash or a failure leaves the previous file or the new one, never a torn one, and no
    temp file after a failure.

    Raises:
        DiskTierError: The write failed; the message says why (disk full: free space).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")

    def publish() -> None:
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    try:
        _write_via_temp(tmp, (data,), publish)
    except _WriteFailed as failed:
        exc = failed.error
        what = f"writing {path} ({len(memoryview(data))} bytes) failed while {failed.stage}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            full = "disk full" if exc.errno == errno.ENOSPC else "disk quota exceeded"
            raise DiskTierError(
                f"{full}: {what}; the previous file, if any, is unchanged. Free space on "
                f"that volume or choose a directory on a larger one"
            ) from exc
        raise DiskTierError(f"{what}: {exc.strerror or exc}") from exc


class _WriteFailed(Exception):
    """`_write_via_temp` failed at `stage` with `error`; the temp file is gone."""

    def __init__(self, stage: str, error: OSError) -> None:
        super().__init__(stage)
        self.stage, self.error = stage, error


def _write_via_temp(tmp: Path, buffers: tuple, publish: Callable[[], None]) -> None:
    """Creates `tmp` exclusively, writes `buffers` in order, fsyncs and closes it, then
    calls `publish` (which renames it into place). On an OSError closes the file, removes
    `tmp` and raises `_WriteFailed` naming the stage."""
    stage, fd = "creating the temp file", -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        stage = "writing"
        for buf in buffers:
            _write_all(fd, memoryview(buf))
        stage = "fsync of the temp file"
        os.fsync(fd)
        os.close(fd)
        fd = -1
        stage = "renaming the temp file"
        publish()
    except OSError as exc:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        _unlink_quietly(tmp)
        raise _WriteFailed(stage, exc) from exc


def remove_stale_temp_files(directory: Path, stem: str) -> int:
    """Deletes the temp files ``write_file_atomically`` left for ``directory/stem`` when a
    process died mid-write; returns how many."""
    removed = 0
    for tmp in Path(directory).glob(f".{stem}.*{_TMP_SUFFIX}"):
        _unlink_quietly(tmp)
        removed += 1
    return removed


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(
            f"invalid block key {key!r}: use 1-201 characters from [A-Za-z0-9._-], "
            f"starting with a letter or digit"
        )


def _check_out(out: torch.Tensor, entry: DiskEntry) -> None:
    wanted = ("cpu", entry.dtype, entry.shape)
    if (out.device.type, out.dtype, tuple(out.shape)) != wanted or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous CPU tensor of {entry.dtype} and shape {entry.shape} to "
            f"read block {entry.key!r}; got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array, copying only if it is off-CPU or strided."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy()


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view sharing memory with a contiguous CPU tensor."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def _write_all(fd: int, data: memoryview) -> None:
    """Writes all of ``data``; ``os.write`` may write less (Linux: at most ~2 GiB a call)."""
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


def _fsync_dir(path: Path) -> None:
    """Makes a rename in ``path`` durable; a file's fsync does not cover its directory entry."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error_message(root: Path, entry: DiskEntry, stage: str, exc: OSError) -> str:
    what = f"writing block {entry.key!r} ({entry.nbytes} bytes) to {root} failed while {stage}"
    kept = "nothing was written; the previous block under this key, if any, is still served"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        full = "disk full" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return (
            f"{full}: {what}; {kept}. Free space on that volume, set budget_bytes below "
            f"its free space, or point the disk tier at a larger volume"
        )
    return f"{what}: {exc.strerror or exc}; {kept}"


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
