"""`streamrt bench gen`, decode rows: the Wan VAE's streamed decode against diffusers' own,
and `stream()` with the decode overlapped against sequential, each in the same run.

Wan VAE   diffusers' test config of `AutoencoderKLWan` (8x space, 4x time, 3 channels),
          64x64, 5 latent frames per chunk: `WanVAECodec` (hooks of
          `streamrt.models.wan_vae_fast`, one decoder call per chunk) vs stock
          `AutoencoderKLWan.decode` (one decoder call per latent frame) of the same latents
overlap   `StreamGenerator.stream(num_frames=N)` with `overlap_decode` off and on, interleaved,
          for the model under test and for a tiny Wan-VAE model (`tiny_wan_vae_generator`)
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from streamrt.apps.bench import best_of

PROMPT = "a red circle moving right on a dark background"


def small_wan_vae(seed: int = 0) -> torch.nn.Module:
    """diffusers' test-size `AutoencoderKLWan` (16 latent channels, 8x spatial and 4x
    temporal compression), randomly initialised for `seed`."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()


def wan_vae_decode(chunks: int = 6, repeats: int = 3) -> dict[str, float]:
    """ms per frame of both decodes and their largest difference."""
    from streamrt.models.codec import WanVAECodec

    stock = small_wan_vae(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        codec = WanVAECodec(copy.deepcopy(stock))
        z = torch.randn(1, 16, 5 * chunks, 8, 8)
    frames = codec.decoded_frames(z.shape[2], first=True)
    out: list[torch.Tensor] = []

    def streamed() -> None:
        dec = codec.decoder()
        out[:] = [dec.decode(c) for c in z.split(5, dim=2)]

    with torch.no_grad():
        raw = z * codec.std + codec.mean
        ref = stock.decode(raw).sample
        fast_s = best_of(repeats, streamed)
        stock_s = best_of(repeats, lambda: stock.decode(raw))
    diff = (torch.cat(out, dim=2) - ref).abs().max().item()
    return {"fast": fast_s / frames * 1e3, "stock": stock_s / frames * 1e3, "diff": diff}


def overlap(gen, frames: int = 96, repeats: int = 2) -> dict[str, Any]:
    """ms per frame and first frame of `gen.stream(num_frames=frames)`, both ways."""
    best: dict[bool, tuple[float, float]] = {}
    for _ in range(repeats):
        for on in (False, True):
            t0 = time.perf_counter()
            first = None
            for _frame in gen.stream(PROMPT, num_frames=frames, overlap_decode=on):
                first = first if first is not None else time.perf_counter() - t0
            per_frame = (time.perf_counter() - t0) / frames
            if on not in best or per_frame < best[on][0]:
                best[on] = (per_frame, first)
    return {
        "sequential": best[False][0] * 1e3,
        "overlapped": best[True][0] * 1e3,
        "first_sequential": best[False][1],
        "first_overlapped": best[True][1],
    }


def tiny_wan_vae_generator():
    """An untrained tiny generator on a tiny `AutoencoderKLWan` (2x time, 2x space), 64x64,
    5 latent frames per chunk: a model whose decode is a fair share of its frame time."""
    from streamrt.config import GenConfig
    from streamrt.gen.engine import GenEngine
    from streamrt.gen.generator import StreamGenerator
    from streamrt.models.generator_files import tiny_random_parts
    from streamrt.world import VOCAB

    cfg = GenConfig(chunk_frames=5, policy_args={"sink_blocks": 3, "window_blocks": 15})
    return StreamGenerator(GenEngine(*tiny_random_parts(VOCAB, codec="wan_vae"), cfg))


def decode_rows(gen) -> list[dict[str, Any]]:
    vae = wan_vae_decode()
    rows = [
        {
            "measure": "Wan VAE decode ms/frame (diffusers test config, 64x64)",
            "value": vae["fast"],
            "aim": f"< {vae['stock']:.2f} (diffusers' own decode)",
        },
        {
            "measure": "Wan VAE decode max |diff| vs diffusers",
            "value": vae["diff"],
            "aim": "<= 1e-5",
        },
    ]
    for which, g in (("", gen), (", tiny Wan-VAE model", tiny_wan_vae_generator())):
        ov = overlap(g)
        rows += [
            {
                "measure": f"stream() ms/frame, decode overlapped{which}",
                "value": ov["overlapped"],
                "aim": f"< {ov['sequential']:.1f} (sequential decode)",
            },
            {
                "measure": f"stream() first frame s, decode overlapped{which}",
                "value": ov["first_overlapped"],
                "aim": f"<= {ov['first_sequential']:.3f} (sequential decode)",
            },
        ]
    return rows
