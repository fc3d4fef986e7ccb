"""Latent codecs: pixels <-> what the transformer denoises, frame by frame as a stream.

`PixelCodec` works in pixel space (latents are frames in [-1, 1], optionally averaged
over `spatial` x `spatial` pixels; the tiny models run on it). `WanVAECodec` wraps diffusers' `AutoencoderKLWan` and decodes chunk by chunk with
the decoder's causal conv cache kept per stream, so a streamed decode equals one decode of
the whole video.
"""

from __future__ import annotations

import numpy as np
import torch

from streamrt.errors import InputError


def frames_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 `[F, H, W, 3]` -> float `[1, 3, F, H, W]` in [-1, 1]."""
    t = torch.as_tensor(np.asarray(frames))
    return (t.permute(3, 0, 1, 2).float() / 127.5 - 1.0).unsqueeze(0)


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """float `[1, 3, F, H, W]` in [-1, 1] -> uint8 `[F, H, W, 3]`."""
    x = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


class PixelCodec:
    """Pixel-space codec: 3 latent channels, no temporal compression, and an optional
    spatial factor `spatial` (a latent pixel is the mean of `spatial` x `spatial` pixels;
    decoding upsamples bilinearly). `spatial=1` is the identity.

    The factor is the tiny models' "VAE": it shrinks what the transformer must denoise
    (a 4x4 patch of a 2x latent is 48 values instead of the 192 of an 8x8 pixel patch).
    """

    latent_channels = 3
    temporal = 1

    def __init__(self, spatial: int = 1) -> None:
        if int(spatial) != spatial or spatial < 1:
            raise InputError(f"PixelCodec spatial factor must be a positive integer, got {spatial}")
        self.spatial = int(spatial)

    def frames_needed(self, latent_frames: int) -> int:
        return latent_frames

    def decoded_frames(self, latent_frames: int, first: bool) -> int:
        """Frames that decoding `latent_frames` gives (`first`: the stream's first chunk)."""
        return latent_frames

    def encoder(self) -> PixelCodec:
        return self

    def decoder(self) -> PixelCodec:
        return self

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """`[B, 3, F, H, W]` frames in [-1, 1] -> `[B, 3, F, H/s, W/s]` latents."""
        if self.spatial == 1:
            return frames
        s = self.spatial
        return torch.nn.functional.avg_pool3d(frames, (1, s, s))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.spatial > 1:
            s = self.spatial
            latents = torch.nn.functional.interpolate(
                latents, scale_factor=(1, s, s), mode="trilinear", align_corners=False
            )
        return latents.clamp(-1, 1)


class WanVAECodec:
    """`AutoencoderKLWan` with per-stream causal decode state.

    Args:
        vae: diffusers' `AutoencoderKLWan`.
        fast: Attach `streamrt.models.wan_vae_fast` (faster norm and conv paths on CPU,
            outputs equal within float32 rounding); False keeps diffusers' forwards.
    """

    def __init__(self, vae: torch.nn.Module, fast: bool = True) -> None:
        if fast:
            from streamrt.models.wan_vae_fast import apply_fast_wan_vae

            apply_fast_wan_vae(vae)
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

    def decoded_frames(self, latent_frames: int, first: bool) -> int:
        """Frames that decoding `latent_frames` gives: the stream's first latent frame
        gives one frame, every other `temporal` frames."""
        return self.temporal * latent_frames - (self.temporal - 1 if first else 0)

    def encoder(self) -> _StreamEncoder:
        return _StreamEncoder(self)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Normalised latents of whole clips `[B, 3, F, H, W]` (a new stream each)."""
        return self.encoder().encode(frames)


class _StreamEncoder:
    """Encodes frames as they arrive (video-to-video), keeping the encoder's causal state.

    Wan's VAE encodes the first frame alone, then groups of `temporal` frames, so the first
    chunk of F latent frames takes `1 + temporal * (F - 1)` frames and later ones
    `temporal * F`; the decoder gives back the same counts, one output frame per input.
    Latents are the posterior mean, normalised as Wan's pipeline does.
    """

    def __init__(self, codec: WanVAECodec) -> None:
        self.codec = codec
        self.feat_map = [None] * codec.vae._cached_conv_counts["encoder"]
        self.first = True

    def frames_needed(self, latent_frames: int) -> int:
        t = self.codec.temporal
        return 1 + t * (latent_frames - 1) if self.first else t * latent_frames

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae, c = self.codec.vae, self.codec
        x = pixels
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

            x = patchify(x, patch_size=vae.config.patch_size)
        groups = []
        if c.temporal == 1:
            groups = [x]  # no temporal downsampling: the causal cache makes one call exact
        else:
            if self.first:
                groups.append(x[:, :, :1])
                x = x[:, :, 1:]
            groups += list(x.split(c.temporal, dim=2))
        self.first = False
        outs = [
            vae.encoder(g, feat_cache=self.feat_map, feat_idx=[0]) for g in groups if g.shape[2]
        ]
        mu = vae.quant_conv(torch.cat(outs, dim=2))[:, : c.latent_channels]
        if c.mean is not None and c.std is not None:
            mu = (mu - c.mean.to(mu)) / c.std.to(mu)
        return mu


class _StreamDecoder:
    """Decodes latent frames as they arrive; keeps the decoder's causal conv features.

    diffusers decodes one latent frame per decoder call; here a chunk is one call (the
    stream's very first frame alone). The two agree: every causal conv pads a call's frames
    with the cached last frames of the previous call (or zeros), which is what it sees
    frame by frame, and the temporal upsampler's first call ("Rep": that frame is not
    doubled) is the first frame's alone either way.
    """

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
        calls = [x[:, :, :1], x[:, :, 1:]] if self.first else [x]
        outs = []
        for part in calls:
            if part.shape[2]:
                outs.append(
                    vae.decoder(
                        part, feat_cache=self.feat_map, feat_idx=[0], first_chunk=self.first
                    )
                )
                self.first = False
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1, 1)
