"""Disk tier: bit-exact round trips, reopen, crash safety, corruption and bad input."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from streamrt.cache import disk_store
from streamrt.cache.disk_store import DiskEntry, DiskStore, payload_checksum
from streamrt.cache.errors import CacheError, CorruptBlockError, DiskTierError

REPO = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64]


def _block(seed: int, dtype: torch.dtype = torch.float32, shape=(4, 16)) -> torch.Tensor:
    """Deterministic block; floats carry NaN, -0.0 and inf so bit-exactness is tested."""
    g = torch.Generator().manual_seed(seed)
    if not dtype.is_floating_point:
        return torch.randint(-(2**40), 2**40, shape, generator=g, dtype=dtype)
    t = torch.randn(shape, generator=g).to(dtype)
    t.view(-1)[:4] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")])
    return t


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def _files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(tmp_path, dtype):
    store = DiskStore(tmp_path)
    t = _block(1, dtype)
    meta = {"spec": {"heads": 2, "dims": (4, 16)}, "position": 128, "note": "kv"}

    entry = store.put("seq.0.block-1", t, meta)

    assert entry == DiskEntry(
        key="seq.0.block-1",
        dtype=dtype,
        shape=(4, 16),
        nbytes=t.numel() * t.element_size(),
        checksum=payload_checksum(t.view(torch.uint8).numpy()),
        meta={"spec": {"heads": 2, "dims": [4, 16]}, "position": 128, "note": "kv"},
        path=tmp_path / "seq.0.block-1.kv",
    )
    assert store.entry("seq.0.block-1") == entry
    got = store.get("seq.0.block-1")
    assert _same_bits(got, t) and got.device.type == "cpu"
    out = torch.zeros_like(t)
    assert store.get("seq.0.block-1", out=out) is out
    assert _same_bits(out, t)
    assert store.stats() == {
        "files": 1,
        "bytes": entry.nbytes,
        "writes": 1,
        "reads": 2,
        "bytes_written": entry.nbytes,
        "bytes_read": 2 * entry.nbytes,
        "corrupt": 0,
        "discarded_tmp": 0,
        "write_errors": 0,
        "missing": 0,
    }


def test_strided_scalar_and_empty_tensors_round_trip(tmp_path):
    store = DiskStore(tmp_path)
    strided = _block(2).t()  # non-contiguous: stored as its contiguous copy
    cases = {"strided": strided, "scalar": torch.tensor(3.5), "empty": torch.empty(0, 8)}
    for key, t in cases.items():
        store.put(key, t)
    for key, t in cases.items():
        assert _same_bits(store.get(key), t), key
    assert store.entry("empty").nbytes == 0
    assert store.entry("scalar").shape == ()


def test_get_out_must_match_the_block(tmp_path):
    store = DiskStore(tmp_path)
    store.put("a", _block(3))
    bad_outs = [
        torch.empty(4, 16, dtype=torch.float16),
        torch.empty(16, 4),
        torch.empty(16, 4).t(),  # right shape, not contiguous
    ]
    for out in bad_outs:
        with pytest.raises(ValueError, match="'a'"):
            store.get("a", out=out)
    assert store.stats()["reads"] == 0
    assert _same_bits(store.get("a"), _block(3))


def test_overwrite_and_delete_keep_index_and_disk_in_step(tmp_path):
    store = DiskStore(tmp_path)
    store.put("a", _block(1))
    store.put("b", _block(2))
    store.put("a", _block(3, shape=(2, 8)), {"v": 2})

    assert _same_bits(store.get("a"), _block(3, shape=(2, 8)))
    assert store.entry("a").meta == {"v": 2}
    assert store.used_bytes == (2 * 8 + 4 * 16) * 4
    assert _files(tmp_path) == ["a.kv", "b.kv"]

    store.delete("a")
    assert "a" not in store and len(store) == 1 and store.keys() == ["b"]
    assert store.used_bytes == 4 * 16 * 4
    assert _files(tmp_path) == ["b.kv"]
    with pytest.raises(KeyError, match="'a'"):
        store.get("a")
    with pytest.raises(KeyError, match="'a'"):
        store.delete("a")


def test_reopen_finds_every_block_with_its_contents_and_meta(tmp_path):
    store = DiskStore(tmp_path)
    blocks = {f"blk{i}": _block(i, DTYPES[i % 4], shape=(i + 1, 8)) for i in range(6)}
    for i, (key, t) in enumerate(blocks.items()):
        store.put(key, t, {"index": i, "tags": ["x", i]})
    store.put("blk0", _block(99), {"index": 0, "rewritten": True})
    store.delete("blk5")
    blocks["blk0"] = _block(99)
    del blocks["blk5"]

    again = DiskStore(tmp_path)

    assert sorted(again.keys()) == sorted(blocks)
    for key, t in blocks.items():
        assert again.entry(key) == store.entry(key)
        assert _same_bits(again.get(key), t)
    assert again.entry("blk0").meta == {"index": 0, "rewritten": True}
    assert again.entry("blk3").meta == {"index": 3, "tags": ["x", 3]}
    assert again.used_bytes == store.used_bytes
    assert again.stats()["files"] == 5
    assert again.stats()["corrupt"] == again.stats()["discarded_tmp"] == 0


def test_concurrent_puts_and_gets_keep_the_index_consistent(tmp_path):
    store = DiskStore(tmp_path)
    errors = []

    def worker(w):
        try:
            for i in range(20):
                key = f"w{w}.{i % 5}"
                store.put(key, _block(100 * w + i))
                assert _same_bits(store.get(key), _block(100 * w + i))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(store) == 20 and store.used_bytes == 20 * 4 * 16 * 4
    assert store.stats()["writes"] == 80 and store.verify() == []
    assert len(_files(tmp_path)) == 20


# ---------------------------------------------------------------------- crash safety

# Writes 2 MiB blocks over 4 keys (so later puts overwrite earlier ones) and reports
# "key i" only after put returned. With a tear index it stops halfway through that
# put's payload and waits to be killed, so a torn temp file is certain.
_CHILD = """
import sys, time, torch
from streamrt.cache import disk_store
root, tear_at = sys.argv[1], int(sys.argv[2])
state = {"i": -1}
real_write = disk_store._write_all
def write(fd, data):
    if state["i"] == tear_at and len(data) > 4096:
        real_write(fd, data[: len(data) // 2])
        print("TORN", flush=True)
        time.sleep(60)
    real_write(fd, data)
disk_store._write_all = write
store = disk_store.DiskStore(root)
for i in range(48):
    state["i"] = i
    torch.manual_seed(i)
    store.put(f"k{i % 4}", torch.randn(1 << 19), {"i": i})
    print(f"k{i % 4} {i}", flush=True)
"""


def _expected(i: int) -> torch.Tensor:
    """What the child wrote for step ``i``; a fresh generator replays its manual_seed(i)."""
    return torch.randn(1 << 19, generator=torch.Generator().manual_seed(i))


def _run_and_kill(root: Path, lines_before_kill: int, delay: float, tear_at: int = -1):
    """Runs the child, SIGKILLs it, and returns the (key, i) pairs it reported."""
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root), str(tear_at)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = []
    try:
        while len(lines) < lines_before_kill and (line := proc.stdout.readline()):
            lines.append(line.split())
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        lines += [line.split() for line in proc.stdout.read().splitlines()]
    finally:
        proc.kill()
        proc.stdout.close()
        stderr = proc.stderr.read()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"child finished before the kill: {stderr}"
    assert len(lines) >= lines_before_kill, f"child reported too little: {stderr}"
    return [(key, int(i)) for key, i in (line for line in lines if line != ["TORN"])]


@pytest.mark.parametrize(
    ("lines_before_kill", "delay", "tear_at"),
    [(2, 0.002, -1), (5, 0.006, -1), (3, 0.013, -1), (8, 0.0, 7)],
    ids=["kill-after-2ms", "kill-after-6ms", "kill-after-13ms", "torn-overwrite"],
)
def test_sigkill_mid_write_loses_no_reported_block(tmp_path, lines_before_kill, delay, tear_at):
    reported = _run_and_kill(tmp_path, lines_before_kill, delay, tear_at)
    leftover_tmp = [n for n in _files(tmp_path) if n.endswith(".tmp")]
    if tear_at >= 0:
        assert leftover_tmp, "the torn write should have left its temp file"

    store = DiskStore(tmp_path)

    assert store.stats()["discarded_tmp"] == len(leftover_tmp)
    assert store.stats()["corrupt"] == 0
    assert not [n for n in _files(tmp_path) if not n.endswith(".kv")]
    last = {key: i for key, i in reported}
    # The put in flight at the kill may or may not have reached its rename.
    in_flight = reported[-1][1] + 1
    for key, i in last.items():
        got = store.get(key)
        candidates = [i] + ([in_flight] if f"k{in_flight % 4}" == key else [])
        assert any(_same_bits(got, _expected(c)) for c in candidates), (key, candidates)
        assert store.entry(key).meta["i"] in candidates
    assert set(store.keys()) <= set(last) | {f"k{in_flight % 4}"}
    if tear_at >= 0:
        assert store.entry(f"k{tear_at % 4}").meta == {"i": tear_at - 4}
    assert store.verify() == []


def _flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def test_torn_and_bit_flipped_files_are_never_served(tmp_path):
    store = DiskStore(tmp_path)
    for i, key in enumerate(["torn", "stub", "hdrflip", "payflip", "good"]):
        store.put(key, _block(i), {"i": i})
    size = (tmp_path / "torn.kv").stat().st_size
    os.truncate(tmp_path / "torn.kv", size - 100)  # lost the payload's tail
    os.truncate(tmp_path / "stub.kv", 10)  # not even a full prefix
    # One bit turns meta "i":2 into "i":3: still valid JSON, so only the header crc sees it.
    _flip_byte(tmp_path / "hdrflip.kv", (tmp_path / "hdrflip.kv").read_bytes().index(b'"i":2') + 4)
    _flip_byte(tmp_path / "payflip.kv", size - 1)  # inside the payload
    (tmp_path / ".good.0123abcd.tmp").write_bytes(b"half a write")

    with pytest.warns(RuntimeWarning, match="corrupt"):
        again = DiskStore(tmp_path)

    assert sorted(again.keys()) == ["good", "payflip"]
    assert again.stats()["corrupt"] == 3 and again.stats()["discarded_tmp"] == 1
    assert _files(tmp_path) == [
        "good.kv",
        "hdrflip.kv.corrupt",
        "payflip.kv",
        "stub.kv.corrupt",
        "torn.kv.corrupt",
    ]
    with pytest.warns(RuntimeWarning), pytest.raises(CorruptBlockError, match="payflip") as info:
        again.get("payflip", out=torch.empty(4, 16))
    assert str(tmp_path / "payflip.kv") in str(info.value)
    assert isinstance(info.value, CacheError)
    assert "payflip" not in again and again.stats()["corrupt"] == 4
    assert (tmp_path / "payflip.kv.corrupt").exists()
    assert _same_bits(again.get("good"), _block(4))
    assert again.used_bytes == again.entry("good").nbytes

    third = DiskStore(tmp_path)  # quarantined files are not rescanned
    assert third.keys() == ["good"] and third.stats()["corrupt"] == 0


def test_verify_finds_blocks_that_rotted_after_open(tmp_path):
    store = DiskStore(tmp_path)
    for i in range(3):
        store.put(f"b{i}", _block(i))
    _flip_byte(tmp_path / "b1.kv", (tmp_path / "b1.kv").stat().st_size - 7)

    with pytest.warns(RuntimeWarning):
        assert store.verify() == ["b1"]

    assert store.keys() == ["b0", "b2"] and store.stats()["corrupt"] == 1
    assert store.verify() == []
    assert _same_bits(store.get("b2"), _block(2))


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("key", ["", ".hidden", "a/b", "../up", "a b", "ü", "x" * 202])
def test_invalid_key_is_rejected_before_any_write(tmp_path, key):
    store = DiskStore(tmp_path)
    with pytest.raises(ValueError, match="invalid block key"):
        store.put(key, _block(0))
    assert _files(tmp_path) == [] and len(store) == 0


def test_longest_and_punctuated_keys_are_valid(tmp_path):
    store = DiskStore(tmp_path)
    for key in ["x" * 201, "A-1_b.c", "0"]:
        store.put(key, _block(0))
    assert len(DiskStore(tmp_path)) == 3


def test_non_json_meta_is_rejected(tmp_path):
    store = DiskStore(tmp_path)
    with pytest.raises(ValueError, match="JSON"):
        store.put("a", _block(0), {"t": torch.zeros(1)})
    assert _files(tmp_path) == []


def test_root_under_a_regular_file_is_refused(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    for root in (blocker, blocker / "kv"):
        with pytest.raises(DiskTierError, match="not-a-dir") as info:
            DiskStore(root)
        assert "directory" in str(info.value)


def test_read_only_root_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "ro"
    root.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes through 0o500; play the kernel's part instead
        real_open = os.open

        def denied(path, *args, **kwargs):
            if Path(path).parent == root:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(disk_store.os, "open", denied)
    try:
        with pytest.raises(DiskTierError, match="not writable") as info:
            DiskStore(root)
    finally:
        root.chmod(0o700)
    assert str(root) in str(info.value) and "permissions" in str(info.value)


def test_budget_is_enforced_without_touching_the_store(tmp_path):
    nbytes = 4 * 16 * 4
    store = DiskStore(tmp_path, budget_bytes=2 * nbytes)
    store.put("a", _block(1))
    store.put("b", _block(2))

    with pytest.raises(DiskTierError, match="budget"):
        store.put("c", _block(3))

    assert store.keys() == ["a", "b"] and _files(tmp_path) == ["a.kv", "b.kv"]
    assert store.used_bytes == 2 * nbytes and store.stats()["writes"] == 2
    store.put("a", _block(4))  # same size: the old block's bytes are freed
    store.delete("b")
    store.put("c", _block(3))
    assert store.keys() == ["a", "c"] and store.used_bytes == 2 * nbytes


@pytest.mark.parametrize("fail_in", ["write", "fsync"])
def test_disk_full_keeps_the_previous_block(tmp_path, monkeypatch, fail_in):
    store = DiskStore(tmp_path)
    store.put("a", _block(1), {"v": 1})
    store.put("b", _block(2))

    def full(*args):
        if fail_in == "write":
            fd, data = args
            real_write(fd, data[: len(data) // 2])  # part of it lands, then the disk fills
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_write = disk_store._write_all
    if fail_in == "write":
        monkeypatch.setattr(disk_store, "_write_all", full)
    else:
        monkeypatch.setattr(disk_store.os, "fsync", full)
    with pytest.raises(DiskTierError, match="disk full") as info:
        store.put("a", _block(9), {"v": 2})
    monkeypatch.undo()

    assert str(tmp_path) in str(info.value) and "'a'" in str(info.value)
    assert _files(tmp_path) == ["a.kv", "b.kv"]  # no temp file left
    assert _same_bits(store.get("a"), _block(1)) and store.entry("a").meta == {"v": 1}
    stats = store.stats()
    assert (stats["writes"], stats["write_errors"], stats["files"]) == (2, 1, 2)
    assert stats["bytes"] == store.used_bytes == 2 * 4 * 16 * 4
    again = DiskStore(tmp_path)
    assert _same_bits(again.get("a"), _block(1)) and again.stats()["discarded_tmp"] == 0
