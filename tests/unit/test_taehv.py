"""A user's TAEHV-style tiny decoder: loads, streams like one whole decode, drives a generator."""

import pytest
import torch

from streamrt.config import GenConfig
from streamrt.errors import InputError
from streamrt.gen.engine import GenEngine
from streamrt.gen.generator import StreamGenerator
from streamrt.models.generator_files import tiny_random_parts
from streamrt.models.taehv import TAEHVDecoder, TinyDecoderCodec
from streamrt.world import VOCAB

pytestmark = pytest.mark.usefixtures("one_thread_quiet")

PROMPT = "a red circle moving right on a dark background"


def tiny_taehv(latent_channels=4, time=(True, True), space=(True, True, True), seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TAEHVDecoder(latent_channels, (16, 8, 8, 8), time, space).eval()


def save_checkpoint(model: TAEHVDecoder, path):
    """A file laid out as taehv's own: encoder.* and decoder.* keys."""
    state = dict(model.state_dict())
    state["encoder.0.weight"] = torch.zeros(8, 3, 3, 3)  # a decoder-only load skips it
    torch.save(state, path)


def test_streamed_chunks_equal_one_whole_decode():
    model = tiny_taehv()
    assert (model.temporal, model.spatial) == (4, 8)
    z = torch.randn(1, 4, 7, 4, 4)
    with torch.no_grad():
        whole = model.decode(z)
        memory = []
        parts = [
            model.decode(z[:, :, a:b], memory, first=a == 0) for a, b in [(0, 3), (3, 4), (4, 7)]
        ]
        forgetful = model.decode(z[:, :, 3:4], [], first=False)
    assert whole.shape == (1, 3, 1 + 4 * 6, 32, 32)  # the first latent frame gives one frame
    assert [p.shape[2] for p in parts] == [1 + 4 * 2, 4, 4 * 3]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-6, rtol=0)
    assert len(memory) == 9  # one frame per MemBlock
    # the memory carries real context: without it the second chunk comes out otherwise
    assert not torch.allclose(forgetful, parts[1], atol=1e-4)


def test_checkpoint_loads_with_widths_and_strides_from_its_shapes(tmp_path):
    model = tiny_taehv(time=(True, False))
    save_checkpoint(model, tmp_path / "taew.pth")
    loaded = TAEHVDecoder.from_file(tmp_path / "taew.pth")
    assert (loaded.temporal, loaded.latent_channels) == (2, 4)
    z = torch.randn(1, 4, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), model.decode(z))
    torch.save({"decoder.1.weight": torch.zeros(2, 2, 3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="not a TAEHV-style decoder"):
        TAEHVDecoder.from_file(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TAEHVDecoder.from_file(tmp_path / "missing.pth")


def test_generator_decodes_with_a_tiny_decoder_the_user_brings(tmp_path):
    parts = tiny_random_parts(VOCAB, codec="wan_vae")  # 4 channels, 2x time, 2x space
    StreamGenerator(GenEngine(*parts, GenConfig(height=32, width=32))).save_pretrained(
        tmp_path / "gen"
    )
    tiny = tiny_taehv(time=(True, False), space=(False, False, True))
    save_checkpoint(tiny, tmp_path / "taew.pth")
    gen = StreamGenerator.from_pretrained(tmp_path / "gen", tiny_decoder=tmp_path / "taew.pth")
    assert isinstance(gen.engine.codec, TinyDecoderCodec)
    frames = list(gen.stream(PROMPT, num_frames=12, overlap_decode=True))
    seq = list(gen.stream(PROMPT, num_frames=12, overlap_decode=False))
    assert len(frames) == 12 and frames[0].shape == (32, 32, 3)
    assert all((a == b).all() for a, b in zip(frames, seq))
    gen.save_pretrained(tmp_path / "again")  # the VAE is saved, not the tiny decoder
    assert (tmp_path / "again" / "vae").is_dir()
    with pytest.raises(InputError, match="bring the tiny decoder of this VAE"):
        TinyDecoderCodec(parts[2], tiny_taehv())  # 4x time, 8x space: another VAE's
