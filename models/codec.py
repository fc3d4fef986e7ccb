"""Latent codecs: pixels <-> what the transformer denoises, frame by frame as a stream.

`PixelCodec` is the identity (latents are frames in [-1, 1]; tiny models run in pixel
space). `WanVAECodec` wraps diffusers' `AutoencoderKLWan` and decodes chunk by chunk with
the decoder's causal conv cache kept per stream, so a streamed decode equals one decode of
the whole video.
"""

from __future__ import annotations

import numpy as np
import torch


def frames_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 `[F, H, W, 3]` -> float `[1, 3, F, H, W]` in [-1, 1]."""
    t = torch.as_tensor(np.asarray(frames))
    return (t.permute(3, 0, 1, 2).float() / 127.5 - 1.0).unsqueeze(0)


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """float `[1, 3, F, H, W]` in [-1, 1] -> uint8 `[F, H, W, 3]`."""
    x = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


class PixelCodec:
    """Identity codec: 3 latent channels, no spatial or temporal compression."""

    latent_channels = 3
    spatial = 1
    temporal = 1

    def encoder(self) -> PixelCodec:
        return self

    def decoder(self) -> PixelCodec:
        return self

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return frames

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class WanVAECodec:
    """`AutoencoderKLWan` with per-stream causal decode state."""

    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae = vae.eval()
        cfg = vae.config
        self.latent_channels = cfg.z_dim
        self.spatial = 2 ** len(cfg.temperal_downsample)
        self.temporal = 2 ** sum(cfg.temperal_downsample)
        shape = (1, cfg.z_dim, 1, 1, 1)
        # Latents are normalised per channel (Wan's pipeline); a config whose statistics do
        # not match z_dim (diffusers' defaults on a tiny VAE) has none.
        stats = (cfg.latents_mean, cfg.latents_std)
        usable = all(s is not None and len(s) == cfg.z_dim for s in stats)
        self.mean = torch.tensor(cfg.latents_mean).view(shape) if usable else None
        self.std = torch.tensor(cfg.latents_std).view(shape) if usable else None

    def decoder(self) -> _StreamDecoder:
        return _StreamDecoder(self)

    def encoder(self):
        # Partial: a causal streaming encode (first frame alone, then groups of `temporal`)
        # is not written yet, so video-to-video needs the pixel codec for now.
        raise NotImplementedError(
            "video-to-video with a Wan VAE codec is not supported yet (streaming encode)"
        )


class _StreamDecoder:
    """Decodes latent frames as they arrive; keeps the decoder's causal conv features."""

    def __init__(self, codec: WanVAECodec) -> None:
        self.codec = codec
        self.feat_map = [None] * codec.vae._cached_conv_counts["decoder"]
        self.first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae, c = self.codec.vae, self.codec
        z = latents
        if c.mean is not None and c.std is not None:
            z = z * c.std.to(z) + c.mean.to(z)  # un-normalise, as Wan's pipeline does
        x = vae.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):
            # diffusers' own per-frame decode loop, with the cache kept across calls.
            out = vae.decoder(
                x[:, :, i : i + 1], feat_cache=self.feat_map, feat_idx=[0], first_chunk=self.first
            )
            self.first = False
            outs.append(out)
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1, 1)
