"""Generator directories: save and load the parts a `StreamGenerator` needs.

streamrt.json     {"format": "streamrt-generator", "codec": "pixel" | "wan_vae",
                   "codec_spatial": s (pixel codec only, default 1),
                   "text_len": N, "gen": {GenConfig fields}}
transformer/      diffusers WanTransformer3DModel (save_pretrained)
text_encoder/     transformers UMT5EncoderModel
tokenizer/        its tokenizer
vae/              diffusers AutoencoderKLWan (codec "wan_vae" only)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from transformers import UMT5Config, UMT5EncoderModel

from streamrt.config import GenConfig
from streamrt.errors import InputError
from streamrt.models.codec import PixelCodec, WanVAECodec
from streamrt.models.text import TextEncoder, word_tokenizer
from streamrt.models.wan import build_wan, tiny_wan_config
from streamrt.models.wan_checkpoints import load_wan_transformer, load_wan_vae
from streamrt.models.wan_keys import CheckpointError, NonFiniteWeightsError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


REBUILD = "rebuild the model directory (`streamrt train gen` for the embedded one) or restore it"


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} is missing or unreadable ({what}); {REBUILD}")


class ModelFileError(CheckpointError):
    """A part of a generator directory exists but cannot be read (corrupt, truncated)."""


@contextlib.contextmanager
def _reading(parts: list[Path], what: str):
    """Re-raise any failure to read the directories `parts` as a `ModelFileError` naming
    the file (when the error does) or every file in them."""
    try:
        yield
    except (FileNotFoundError, NonFiniteWeightsError):  # they say what is wrong already
        raise
    except Exception as exc:
        files = [str(f) for part in parts if part.is_dir() for f in sorted(part.iterdir())]
        named = next((f for f in files if f in str(exc)), None) or ", ".join(files) or parts[0]
        raise ModelFileError(
            f"{named}: cannot read the {what} ({type(exc).__name__}: {exc}); the file is "
            f"corrupt or truncated: {REBUILD}"
        ) from exc


PIPELINE_MANIFEST = {"codec": "wan_vae", "text_len": 512, "gen": {}}
"""How a diffusers Wan pipeline directory (model_index.json) is read: UMT5 prompts of 512
tokens, the Wan VAE, and streamrt's default generation settings unless a preset says more."""


def load_generator_parts(
    path: Path,
    manifest: dict[str, Any],
    cfg: GenConfig,
    checkpoint: Path | None = None,
    tiny_decoder: Path | None = None,
):
    """Transformer, text encoder and codec of a generator (or diffusers Wan pipeline) directory.

    `checkpoint` (a distilled causal generator: Self-Forcing, CausVid, Rolling/Reward
    Forcing, StreamDiffusionV2 `.pt`, or any layout `load_wan_transformer` reads) replaces
    the directory's transformer weights; its config comes from `transformer/config.json`.
    `tiny_decoder` (a TAEHV-style `.pth`, `streamrt.models.taehv`) decodes instead of the
    directory's VAE.
    """
    dtype = _DTYPES[cfg.dtype]
    if checkpoint is not None and not checkpoint.exists():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} does not exist: pass the path of a generator checkpoint "
            "(.pt, .pth or .safetensors)"
        )
    for part in ("transformer", "text_encoder", "tokenizer"):
        if not (path / part).is_dir():
            raise _missing(path / part, f"the {part}")
    # load_wan_transformer raises CheckpointError (a ValueError) naming the file and what
    # does not match; it never leaves random weights behind.
    with _reading([path / "transformer"], "transformer"):
        if checkpoint is None:
            transformer = load_wan_transformer(path / "transformer", dtype=dtype)
        else:
            config = json.loads((path / "transformer" / "config.json").read_text())
            config = {k: v for k, v in config.items() if not k.startswith("_")}
            transformer = load_wan_transformer(checkpoint, config=config, dtype=dtype)
    with _reading([path / "text_encoder", path / "tokenizer"], "text encoder or tokenizer"):
        text = TextEncoder.from_pretrained(path, manifest.get("text_len", 16))
    codec_name = manifest.get("codec", "pixel")
    if codec_name == "pixel":
        codec = PixelCodec(manifest.get("codec_spatial", 1))
    elif codec_name == "wan_vae":
        with _reading([path / "vae"], "VAE"):
            codec = WanVAECodec(load_wan_vae(path / "vae"))
    else:
        raise InputError(f"{path}/streamrt.json: unknown codec {codec_name!r} (pixel, wan_vae)")
    if tiny_decoder is not None:
        from streamrt.models.taehv import TAEHVDecoder, TinyDecoderCodec

        if not isinstance(codec, WanVAECodec):
            raise InputError(
                f"a tiny decoder replaces a Wan VAE's decoding; {path} has the {codec_name} "
                "codec: leave the tiny decoder out"
            )
        # the Upsamples carry no weights: a VAE that upsamples 2^k times in space is
        # taken to pair with a tiny decoder whose last k stages upsample (taew2_1: all 3)
        k = codec.spatial.bit_length() - 1
        space = tuple(stage >= 3 - k for stage in range(3))
        codec = TinyDecoderCodec(codec, TAEHVDecoder.from_file(tiny_decoder, space))
    return transformer, text, codec


def save_generator_parts(path: Path, engine, manifest_name: str, fmt: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    engine.transformer.save_pretrained(path / "transformer")
    engine.text_encoder.save_pretrained(path)
    codec = "pixel"
    base = getattr(engine.codec, "base", engine.codec)  # a tiny decoder is not saved
    if isinstance(base, WanVAECodec):
        base.vae.save_pretrained(path / "vae")
        codec = "wan_vae"
    manifest = {
        "format": fmt,
        "version": 1,
        "codec": codec,
        **({"codec_spatial": engine.codec.spatial} if codec == "pixel" else {}),
        "text_len": engine.text_encoder.text_len,
        "gen": _jsonable(dataclasses.asdict(engine.config)),
    }
    (path / manifest_name).write_text(json.dumps(manifest, indent=2))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "device"}


def tiny_random_parts(
    vocab: list[str],
    text_len: int = 16,
    codec: str = "pixel",
    seed: int = 0,
    spatial: int = 1,
    **wan: Any,
):
    """Randomly initialised tiny parts (for tests and as the untrained start of training).

    Pixel codec: 3 channels averaged over `spatial` x `spatial` pixels, patch 8/`spatial`
    (64 tokens per 64x64 frame either way); "wan_vae": a tiny
    `AutoencoderKLWan` with 4 latent channels, 2x spatial and temporal compression.
    """
    tokenizer = word_tokenizer(vocab, text_len)
    enc_cfg = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = UMT5EncoderModel(enc_cfg)
    if codec == "pixel":
        codec_obj = PixelCodec(spatial)
        side = max(1, 8 // spatial)
        defaults = {"in_channels": 3, "out_channels": 3, "patch_size": (1, side, side)}
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            vae = AutoencoderKLWan(
                base_dim=8,
                z_dim=4,
                dim_mult=[1, 2],
                num_res_blocks=1,
                temperal_downsample=[True],
                attn_scales=[],
                latents_mean=[0.0] * 4,
                latents_std=[1.0] * 4,
            )
        codec_obj = WanVAECodec(vae)
        defaults = {"in_channels": 4, "out_channels": 4, "patch_size": (1, 2, 2)}
    config = tiny_wan_config(text_dim=32, **{**defaults, **wan})
    return build_wan(config, seed), TextEncoder(encoder, tokenizer, text_len), codec_obj
