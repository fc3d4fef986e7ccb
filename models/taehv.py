"""A TAEHV-style tiny video decoder (madebyollin's taehv / taew2_1 layout) as a streaming codec.

A tiny decoder turns Wan latents into frames at a fraction of the VAE's cost, as the
streaming anchors (StreamDiffusionV2, Self-Forcing demos) do. Its layers are 2-D convs
over frames; temporal context comes only from `MemBlock`s, which see the previous frame's
input, and `TGrow`s, which turn each frame into `stride` frames:

    Clamp, conv, ReLU, 3 x MemBlock, Upsample, TGrow, conv,
                       3 x MemBlock, Upsample, TGrow, conv,
                       3 x MemBlock, Upsample, TGrow, conv, ReLU, conv  -> RGB in [0, 1]

(indices 0..22 of `decoder.*` in a checkpoint). The first `temporal - 1` frames of a
video are dropped (the first latent frame gives one frame, as Wan's VAE does). Streaming
keeps, per MemBlock, the last frame it saw, so a chunk-by-chunk decode equals one decode
of the whole video (`tests/unit/test_taehv.py`). Widths and time strides are read from the
checkpoint's shapes; `space_upscale` (no weights) says which Upsamples double the size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from streamrt.errors import InputError


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """A residual block that also sees the previous frame's input (`past`)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in * 2, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    """Each frame becomes `stride` consecutive frames (channel groups of one 1x1 conv)."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).reshape(-1, x.shape[1], *x.shape[2:])


class TAEHVDecoder(nn.Module):
    """The decoder half of a TAEHV-style tiny autoencoder.

    Args:
        latent_channels: Channels of a latent frame (16 for Wan 2.1).
        widths: The four stage widths (taehv: 256, 128, 64, 64).
        time_upscale: Per TGrow after the first, whether it doubles the frames.
        space_upscale: Per Upsample, whether it doubles height and width.
    """

    def __init__(
        self,
        latent_channels: int = 16,
        widths: tuple[int, int, int, int] = (256, 128, 64, 64),
        time_upscale: tuple[bool, bool] = (True, True),
        space_upscale: tuple[bool, bool, bool] = (True, True, True),
    ) -> None:
        super().__init__()
        n = widths
        strides = (1, *(2 if t else 1 for t in time_upscale))
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, n[0]), nn.ReLU()]
        for stage in range(3):
            layers += [MemBlock(n[stage], n[stage]) for _ in range(3)]
            layers += [
                nn.Upsample(scale_factor=2 if space_upscale[stage] else 1),
                TGrow(n[stage], strides[stage]),
                _conv(n[stage], n[stage + 1], bias=False),
            ]
        layers += [nn.ReLU(), _conv(n[3], 3)]
        self.decoder = nn.Sequential(*layers)
        self.latent_channels = latent_channels
        self.temporal = strides[0] * strides[1] * strides[2]
        self.spatial = 2 ** sum(space_upscale)

    @classmethod
    def from_file(
        cls, path: str | Path, space_upscale: tuple[bool, bool, bool] = (True, True, True)
    ) -> TAEHVDecoder:
        """Load the `decoder.*` weights of a TAEHV checkpoint (`.pth` or `.safetensors`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tiny decoder {path} does not exist: pass a TAEHV .pth file")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if k.startswith("decoder.")}
        try:
            widths = tuple(state[f"decoder.{i}.weight"].shape[0] for i in (1, 8, 14, 20))
            strides = [
                state[f"decoder.{i}.conv.weight"].shape[0] // w
                for i, w in ((13, widths[1]), (19, widths[2]))
            ]
            model = cls(
                state["decoder.1.weight"].shape[1],
                widths,  # type: ignore[arg-type]
                (strides[0] == 2, strides[1] == 2),
                space_upscale,
            )
            model.load_state_dict(state)
        except (KeyError, RuntimeError) as exc:
            raise InputError(
                f"{path}: not a TAEHV-style decoder checkpoint (decoder.0 .. decoder.22 as in "
                f"taehv / taew2_1.pth): {exc}"
            ) from None
        return model.eval()

    def decode(
        self, latents: torch.Tensor, memory: list[torch.Tensor] | None = None, first: bool = True
    ) -> torch.Tensor:
        """Frames `[B, 3, T, H, W]` in [0, 1] of raw latents `[B, C, F, h, w]`.

        `memory`: per MemBlock, the last frame it saw in the previous call (updated in
        place; empty on the first call). `first`: drop the video's leading frames.
        """
        b, c, f, h, w = latents.shape
        x = latents.transpose(1, 2).reshape(b * f, c, h, w)
        memory = [] if memory is None else memory
        mem_index = 0
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                frames = x.reshape(b, -1, *x.shape[1:])
                if mem_index < len(memory):
                    before = memory[mem_index]
                else:
                    before = torch.zeros_like(frames[:, :1])
                    memory.append(before)
                past = torch.cat([before, frames[:, :-1]], dim=1).reshape(x.shape)
                memory[mem_index] = frames[:, -1:]
                mem_index += 1
                x = layer(x, past)
            else:
                x = layer(x)
        out = x.reshape(b, -1, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        return out[:, :, self.temporal - 1 :] if first else out


class TinyDecoderCodec:
    """A Wan VAE codec whose decoding is done by a TAEHV-style tiny decoder instead: the
    latent statistics, encoder (video-to-video) and frame counts stay the VAE's."""

    def __init__(self, base, tiny: TAEHVDecoder) -> None:
        if (tiny.latent_channels, tiny.temporal, tiny.spatial) != (
            base.latent_channels,
            base.temporal,
            base.spatial,
        ):
            raise InputError(
                f"the tiny decoder maps {tiny.latent_channels} channels with {tiny.temporal}x "
                f"time and {tiny.spatial}x space, the model's VAE {base.latent_channels}, "
                f"{base.temporal}x and {base.spatial}x: bring the tiny decoder of this VAE"
            )
        self.base = base
        self.tiny = tiny.eval()
        self.latent_channels = base.latent_channels
        self.spatial = base.spatial
        self.temporal = base.temporal

    def encoder(self):
        return self.base.encoder()

    def decoded_frames(self, latent_frames: int, first: bool) -> int:
        return self.base.decoded_frames(latent_frames, first)

    def decoder(self) -> _TinyStreamDecoder:
        return _TinyStreamDecoder(self)


class _TinyStreamDecoder:
    def __init__(self, codec: TinyDecoderCodec) -> None:
        self.codec = codec
        self.memory: list[torch.Tensor] = []
        self.first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        base = self.codec.base
        z = latents
        if base.mean is not None and base.std is not None:
            z = z * base.std.to(z) + base.mean.to(z)  # raw VAE latents, as the VAE decodes
        out = self.codec.tiny.decode(z, self.memory, self.first)
        self.first = False
        return (out * 2 - 1).clamp(-1, 1)
