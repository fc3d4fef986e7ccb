"""`streamrt bench peers`: every method makes the video it is timed on, from the same weights."""

import pytest
import torch

from streamrt.apps.bench import peers


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", peers.METHODS)
def test_each_method_makes_its_frames(method):
    m = peers._one(method, 17, 1)  # the async peer needs one causal block (5 latent frames)
    assert m["total s"] > 0 and 0 < m["first frame s"] <= m["total s"]
    assert m["peak MB"] >= 0


def test_the_skyreels_peer_runs_the_same_weights_as_streamrt():
    transformer, text, _ = peers.tiny_parts()
    sky = peers._skyreels_transformer(transformer)
    x = torch.randn(1, 16, 3, 8, 8)
    t = torch.tensor([500.0])
    embeds = text.encode([peers.PROMPT])
    with torch.no_grad():
        want = transformer(x, t, embeds, return_dict=False)[0]
        got = sky(x, t, embeds, return_dict=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert want.abs().mean() > 1e-3


def test_growth_exponent():
    assert peers._exponent([(10, 1.0), (100, 10.0)]) == pytest.approx(1.0)
    assert peers._exponent([(10, 1.0), (100, 100.0)]) == pytest.approx(2.0)
    assert peers._exponent([(10, 1.0)]) is None


def test_compiled_streamrt_makes_its_frames_and_is_timed():
    m = peers._one("streamrt", 17, 1, "default")
    assert m["total s"] > 0 and 0 < m["first frame s"] <= m["total s"]
    achieved, flops, peak = peers.forward_gflops(1, 2, "default")
    assert achieved > 0 and flops > 0 and peak > 0


def test_a_generator_directorys_forwards_are_counted_at_its_own_settings():
    achieved, flops, _ = peers.forward_gflops(1, 1, "off", "assets/tiny-world")
    _, peer_flops, _ = peers.forward_gflops(1, 1, "off")
    assert achieved > 0 and flops > 0
    assert flops != peer_flops  # its own chunk and tokens, not the peers' model
