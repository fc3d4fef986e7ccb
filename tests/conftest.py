import ctypes
from pathlib import Path

import pytest
import torch

from streamrt.cache import CacheManager, KVSpec

SMALL = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, tokens_per_block=4)  # 1024 bytes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread_quiet():
    """One torch thread (tiny matmuls run faster on these shared 2-core machines) and
    transformers' logging at errors only; restored afterwards. Video-LLM test modules
    use it with `pytestmark = pytest.mark.usefixtures("one_thread_quiet")`."""
    import transformers

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_spec() -> KVSpec:
    return SMALL


def make_manager(
    device_blocks: int = 8, host_blocks: int = 8, spec: KVSpec = SMALL, **kw
) -> CacheManager:
    """A manager whose tiers hold exactly the given numbers of `spec` blocks."""
    return CacheManager(
        device_bytes=spec.block_bytes * device_blocks,
        host_bytes=spec.block_bytes * host_blocks,
        **kw,
    )


def fill(seq, index: int, value: float | None = None) -> torch.Tensor:
    """Write recognisable (or random) K/V into a block and return a copy of it."""
    view = seq.kv(index)
    if value is None:
        view.copy_(torch.randn(view.shape, dtype=torch.float32).to(view.dtype))
    else:
        view.fill_(value)
    return view.clone()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 4 s world clip (4 fps, 64x64) written as an mp4, for the `ask` command's tests."""
    from streamrt.io.sinks import VideoSink
    from streamrt.world import make_clip

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with VideoSink(path, fps=4, width=64, height=64) as sink:
        for frame in make_clip(0, 16).frames:
            sink.write(frame)
    return path


def omp_max_threads() -> int | None:
    """OpenMP's thread count in the calling OS thread, read past torch (whose calls set it
    as a side effect); None where torch's OpenMP runtime is not found."""
    maps = Path("/proc/self/maps")
    text = maps.read_text() if maps.exists() else ""
    libs = sorted({line.split()[-1] for line in text.splitlines() if "libgomp" in line})
    return ctypes.CDLL(libs[0]).omp_get_max_threads() if libs else None
