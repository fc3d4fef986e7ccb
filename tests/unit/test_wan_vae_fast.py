"""The fast Wan VAE path (hooks + one decoder call per chunk) equals stock diffusers."""

import copy

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

from streamrt.models.codec import WanVAECodec
from streamrt.models.wan_vae_fast import (
    CONV_HOOK,
    NORM_HOOK,
    apply_fast_wan_vae,
    remove_fast_wan_vae,
)

CONFIGS = {
    # diffusers' own test config: Wan's topology (8x space, 4x time), 3 channels wide
    "diffusers-test": dict(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ),
    # widening stages (1x1 shortcut convs), 2x time, non-trivial latent statistics
    "widening": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[True],
        attn_scales=[],
        latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[1.5, 0.5, 1.0, 2.0],
    ),
    # `streamrt train vae`'s: no time compression, taps on earlier frames zero (2-D convs)
    "frame-wise": dict(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, False],
        attn_scales=[],
        latents_mean=[0.0, 0.1, -0.1, 0.2],
        latents_std=[1.0, 0.5, 2.0, 1.0],
    ),
}


def stock_and_codec(name: str) -> tuple[AutoencoderKLWan, WanVAECodec]:
    torch.manual_seed(0)
    stock = AutoencoderKLWan(**CONFIGS[name]).eval()
    if name == "frame-wise":
        from streamrt.models.train_vae import freeze_past_taps

        freeze_past_taps(stock)
    return stock, WanVAECodec(copy.deepcopy(stock))


def stock_decode(stock: AutoencoderKLWan, codec: WanVAECodec, z: torch.Tensor) -> torch.Tensor:
    """diffusers' own decode (one decoder call per latent frame) of normalised latents."""
    with torch.no_grad():
        return stock.decode(z * codec.std + codec.mean).sample


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streamed_chunks_equal_stock_diffusers_decode(name):
    stock, codec = stock_and_codec(name)
    z = torch.randn(1, codec.latent_channels, 11, 8, 8)
    ref = stock_decode(stock, codec, z)
    dec = codec.decoder()
    calls = []
    handle = codec.vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[2]))
    parts = [dec.decode(z[:, :, a:b]) for a, b in [(0, 5), (5, 6), (6, 11)]]
    handle.remove()
    assert calls == [1, 4, 1, 5]  # the first frame alone, then one call per chunk
    out = torch.cat(parts, dim=2)
    assert (
        out.shape
        == ref.shape
        == (1, 3, 1 + codec.temporal * 10, 8 * codec.spatial, 8 * codec.spatial)
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert not torch.equal(out, stock_decode(stock, codec, z.flip(2)))  # the check can fail
    convs = [m for m in codec.vae.modules() if isinstance(m, WanCausalConv3d)]
    temporal = [m for m in convs if m.kernel_size[0] > 1]
    frame_wise = [m._diffusers_hook.get_hook(CONV_HOOK)._frame_wise(m) for m in temporal]
    assert sum(frame_wise) == (len(temporal) if name == "frame-wise" else 0)


def test_hooked_modules_equal_stock_and_come_off():
    stock, codec = stock_and_codec("diffusers-test")
    vae = codec.vae
    hooked = [m for m in vae.modules() if isinstance(m, (WanRMS_norm, WanCausalConv3d))]
    assert hooked and all(
        m._diffusers_hook.get_hook(NORM_HOOK if isinstance(m, WanRMS_norm) else CONV_HOOK)
        for m in hooked
    )
    apply_fast_wan_vae(vae)  # twice: still one hook each
    assert all(len(m._diffusers_hook.hooks) == 1 for m in hooked)
    frames = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    with torch.no_grad():
        ref = stock.encode(frames).latent_dist.mode()
        got = vae.encode(frames).latent_dist.mode()
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        x = torch.randn(1, 3, 4, 32, 32)
        for dtype in (torch.float32, torch.bfloat16):  # bf16: diffusers' own forward
            for mod, ref_mod in [(vae.decoder.conv_out, stock.decoder.conv_out)]:
                m, r = mod.to(dtype), ref_mod.to(dtype)
                torch.testing.assert_close(m(x.to(dtype)), r(x.to(dtype)), atol=1e-5, rtol=0)
                m.float(), r.float()
            norm, ref_norm = vae.decoder.norm_out, stock.decoder.norm_out
            tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: a rounding step apart
            torch.testing.assert_close(norm(x.to(dtype)), ref_norm(x.to(dtype)), atol=tol, rtol=0)
        # a zero input: F.normalize's eps keeps it finite, so must the fast norm
        assert torch.equal(norm(torch.zeros_like(x)), ref_norm(torch.zeros_like(x)))
    remove_fast_wan_vae(vae)
    assert all(not m._diffusers_hook.hooks for m in hooked)
    with torch.no_grad():
        assert torch.equal(vae.encode(frames).latent_dist.mode(), ref)  # stock again
