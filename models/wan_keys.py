"""Key and config mapping between the original Wan layout and diffusers' Wan classes.

Pure functions on state dicts and config dicts: no file I/O, no model construction.
The original -> diffusers direction is diffusers' own converter
(`diffusers.loaders.single_file_utils`); diffusers ships no inverse, so the inverses here are
checked against that converter on every call (string work only, cheap), and fail loudly if a
diffusers release changes its mapping.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)

from streamrt.errors import StreamrtError

StateDict = dict[str, torch.Tensor]
Layout = Literal["original", "diffusers"]


class CheckpointError(StreamrtError, ValueError):
    """A checkpoint cannot be loaded: missing, corrupt, unknown layout, or not matching the config."""


class NonFiniteWeightsError(CheckpointError):
    """A checkpoint loads but its weights hold NaN or infinity."""


# Wan's head_dim is 128 in every released size, but heads cannot be read from weight shapes
# (q/k/v are dim x dim), so only sizes that shipped are trusted.
KNOWN_HEADS: dict[int, int] = {
    1536: 12,  # Wan2.1 T2V-1.3B and every causal generator distilled from it
    3072: 24,  # Wan2.2 TI2V-5B
    5120: 40,  # Wan2.1 / Wan2.2 14B
}

# Prefixes that wrappers add in front of every parameter name: Self-Forcing / CausVid save the
# `WanDiffusionWrapper`, whose Wan model sits at `.model`; DDP adds `module.`; ComfyUI-style
# single files use `model.diffusion_model.`.
_LEADING_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "module.")
# Wrappers that FSDP, activation checkpointing and torch.compile insert anywhere in a name.
_INFIX_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove training-wrapper prefixes (`model.`, `module.`, FSDP, torch.compile) from names."""
    out: StateDict = {}
    for key, value in state_dict.items():
        new = key
        for wrapper in _INFIX_WRAPPERS:
            new = new.replace(wrapper, "")
        stripped = True
        while stripped:
            stripped = False
            for prefix in _LEADING_PREFIXES:
                if new.startswith(prefix):
                    new, stripped = new[len(prefix) :], True
        if new in out:
            raise CheckpointError(f"two parameters map to {new!r} after stripping prefixes")
        out[new] = value
    return out


# ---------------------------------------------------------------- transformer keys

_ORIGINAL_MARKERS = (r"^blocks\.\d+\.self_attn\.", r"^head\.head\.", r"^time_embedding\.")
_DIFFUSERS_MARKERS = (r"^blocks\.\d+\.attn1\.", r"^proj_out\.", r"^condition_embedder\.")


def detect_transformer_layout(keys: Iterable[str]) -> Layout:
    """Say whether Wan transformer keys use original names or diffusers names.

    Raises:
        CheckpointError: if the keys look like neither (or both).
    """
    keys = list(keys)

    def hits(patterns: tuple[str, ...]) -> bool:
        return any(re.match(p, k) for p in patterns for k in keys)

    original, diffusers = hits(_ORIGINAL_MARKERS), hits(_DIFFUSERS_MARKERS)
    if original != diffusers:
        return "original" if original else "diffusers"
    raise CheckpointError(
        "unknown checkpoint layout: expected Wan transformer keys such as "
        "'blocks.0.self_attn.q.weight' (original) or 'blocks.0.attn1.to_q.weight' (diffusers); "
        f"first keys: {sorted(keys)[:8]}"
    )


# diffusers' converter leaves the FLF2V image position embedding unmapped; this fills the gap.
_EXTRA_TO_DIFFUSERS = {"img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}


def original_to_diffusers_wan(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename original Wan transformer keys to `WanTransformer3DModel` keys (tensors shared)."""
    # The diffusers converter pops from its argument, so it gets a copy.
    out = convert_wan_transformer_to_diffusers(dict(state_dict))
    return {_EXTRA_TO_DIFFUSERS.get(k, k): v for k, v in out.items()}


# Whole-key prefixes outside the blocks, diffusers -> original.
_TOP_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    ("proj_out.", "head.head."),
    ("scale_shift_table", "head.modulation"),
)
# Inside `blocks.N.`: diffusers' norm2 is the affine cross-attention norm, which Wan calls norm3.
_BLOCK_TO_ORIGINAL = (
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    ("norm2.", "norm3."),
    ("norm3.", "norm2."),
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
    ("scale_shift_table", "modulation"),
)
_ATTN_TO_ORIGINAL = (
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "o."),
    ("add_k_proj.", "k_img."),
    ("add_v_proj.", "v_img."),
    ("norm_added_k.", "norm_k_img."),
)


def _swap_prefix(name: str, table: tuple[tuple[str, str], ...]) -> tuple[str, str] | None:
    for new, old in table:
        if name.startswith(new):
            return old, name[len(new) :]
    return None


def _transformer_key_to_original(key: str) -> str:
    top = _swap_prefix(key, _TOP_TO_ORIGINAL)
    if top is not None:
        return top[0] + top[1]
    match = re.match(r"^blocks\.(\d+)\.(.*)$", key)
    if match is None:
        return key
    head, rest = f"blocks.{match[1]}.", match[2]
    part = _swap_prefix(rest, _BLOCK_TO_ORIGINAL)
    if part is None:
        return key
    if part[0] in ("self_attn.", "cross_attn."):
        leaf = _swap_prefix(part[1], _ATTN_TO_ORIGINAL)
        return head + part[0] + (leaf[0] + leaf[1] if leaf else part[1])
    return head + part[0] + part[1]


def _invert(state_dict: StateDict, to_original, to_diffusers, what: str) -> StateDict:
    """Rename diffusers keys to original ones, checked against diffusers' own converter."""
    names = {to_original(k): k for k in state_dict}
    if len(names) != len(state_dict):
        raise CheckpointError(f"two diffusers keys of the {what} map to the same original key")
    _check_round_trip(names, to_diffusers, what)
    return {old: state_dict[new] for old, new in names.items()}


def _check_round_trip(
    original_keys: dict[str, str], forward: Callable[[dict], dict], what: str
) -> None:
    """Check that `forward` maps every original name back to the diffusers name it came from.

    `original_keys` maps original name -> diffusers name; the converter is run on the names
    themselves (values are passed through untouched), so no tensors are involved.
    """
    back = forward(dict(original_keys))
    wrong = [(new, old) for new, old in back.items() if new != old]
    if wrong or len(back) != len(original_keys):
        raise CheckpointError(
            f"{what}: no exact inverse of diffusers' converter for {len(wrong)} key(s), "
            f"e.g. {wrong[:5]} (this diffusers version renames them differently)"
        )


def diffusers_to_original_wan(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename `WanTransformer3DModel` keys to original Wan keys (tensors shared).

    The exact inverse of `convert_wan_transformer_to_diffusers` for T2V, I2V and FLF2V models.

    Raises:
        CheckpointError: if some key would not convert back to itself.
    """
    return _invert(
        state_dict, _transformer_key_to_original, original_to_diffusers_wan, "Wan transformer"
    )


# ---------------------------------------------------------------- VAE keys

_RESNET_TO_ORIGINAL = (
    ("norm1.", "residual.0."),
    ("conv1.", "residual.2."),
    ("norm2.", "residual.3."),
    ("conv2.", "residual.6."),
    ("conv_shortcut.", "shortcut."),
)
_VAE_PART_TO_ORIGINAL = (
    ("conv_in.", "conv1."),
    ("norm_out.", "head.0."),
    ("conv_out.", "head.2."),
    ("mid_block.attentions.0.", "middle.1."),
)


def _resnet_to_original(rest: str) -> str:
    part = _swap_prefix(rest, _RESNET_TO_ORIGINAL)
    return part[0] + part[1] if part else rest


def _vae_key_to_original(key: str) -> str:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key.replace("post_quant_conv.", "conv2.").replace("quant_conv.", "conv1.")
    side, _, rest = key.partition(".")
    part = _swap_prefix(rest, _VAE_PART_TO_ORIGINAL)
    if part is not None:
        return f"{side}.{part[0]}{part[1]}"
    if m := re.match(r"^mid_block\.resnets\.(\d+)\.(.*)$", rest):
        return f"{side}.middle.{2 * int(m[1])}.{_resnet_to_original(m[2])}"
    if m := re.match(r"^down_blocks\.(\d+)\.(.*)$", rest):
        return f"{side}.downsamples.{m[1]}.{_resnet_to_original(m[2])}"
    # Original decoder stages are flat: 3 residual blocks then 1 resample, so stride 4. This is
    # the same num_res_blocks=2 assumption that diffusers' converter hard-codes.
    if m := re.match(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", rest):
        return f"{side}.upsamples.{4 * int(m[1]) + int(m[2])}.{_resnet_to_original(m[3])}"
    if m := re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", rest):
        return f"{side}.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    return key


def diffusers_to_original_wan_vae(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename `AutoencoderKLWan` keys to the keys of the original `Wan2.1_VAE.pth`.

    Exact only for the Wan2.1 VAE topology (4 stages, num_res_blocks=2), the only one
    diffusers' `convert_wan_vae_to_diffusers` handles.

    Raises:
        CheckpointError: if some key would not convert back to itself.
    """
    return _invert(state_dict, _vae_key_to_original, convert_wan_vae_to_diffusers, "Wan VAE")


def detect_vae_layout(keys: Iterable[str]) -> Layout:
    """Say whether Wan VAE keys use original (`Wan2.1_VAE.pth`) or diffusers names.

    Raises:
        CheckpointError: if the keys are not a Wan2.1 VAE's.
    """
    keys = set(keys)
    if "encoder.conv1.weight" in keys and "decoder.conv1.weight" in keys:
        return "original"
    if "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys:
        return "diffusers"
    raise CheckpointError(
        "unknown VAE layout: expected 'encoder.conv1.weight' (Wan2.1_VAE.pth) or "
        f"'encoder.conv_in.weight' (diffusers AutoencoderKLWan); first keys: {sorted(keys)[:8]}"
    )


# ---------------------------------------------------------------- configs

# Defaults of the original `WanModel.__init__`; its config.json omits fields equal to these.
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "model_type": "t2v",
    "patch_size": (1, 2, 2),
    "text_len": 512,
    "in_dim": 16,
    "dim": 2048,
    "ffn_dim": 8192,
    "freq_dim": 256,
    "text_dim": 4096,
    "out_dim": 16,
    "num_heads": 16,
    "num_layers": 32,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}
_CLIP_DIM = 1280  # open-clip ViT-H image features feeding Wan's I2V/FLF2V image embedder
_FLF2V_TOKENS = 2 * 257  # first + last frame, 257 CLIP tokens each
_DEFAULT_ROPE_LEN = 1024  # WanModel's rope table length; not in its config


def original_config_to_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Turn an original Wan `config.json` dict into `WanTransformer3DModel` kwargs.

    Raises:
        CheckpointError: for features `WanTransformer3DModel` cannot express.
    """
    c = {**ORIGINAL_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if tuple(c["window_size"]) != (-1, -1):
        raise CheckpointError(f"local attention window {c['window_size']} is not supported")
    dim, heads = int(c["dim"]), int(c["num_heads"])
    if dim % heads:
        raise CheckpointError(f"config dim={dim} is not divisible by num_heads={heads}")
    image = c["model_type"] in ("i2v", "flf2v")
    return {
        "patch_size": tuple(c["patch_size"]),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": c["in_dim"],
        "out_channels": c["out_dim"],
        "text_dim": c["text_dim"],
        "freq_dim": c["freq_dim"],
        "ffn_dim": c["ffn_dim"],
        "num_layers": c["num_layers"],
        "cross_attn_norm": bool(c["cross_attn_norm"]),
        "qk_norm": "rms_norm_across_heads" if c["qk_norm"] else None,
        "eps": c["eps"],
        "image_dim": _CLIP_DIM if image else None,
        "added_kv_proj_dim": dim if image else None,
        "rope_max_seq_len": c.get("rope_max_seq_len", _DEFAULT_ROPE_LEN),
        "pos_embed_seq_len": _FLF2V_TOKENS if c["model_type"] == "flf2v" else None,
    }


def diffusers_config_to_original(config: Mapping[str, Any]) -> dict[str, Any]:
    """Turn `WanTransformer3DModel` config into an original Wan `config.json` dict.

    `WanModel` leaves patch_size, text_dim, cross_attn_norm and qk_norm out of its config, so they
    (and `rope_max_seq_len`, which it lacks) are written only when they differ from Wan's
    defaults: real checkpoints get a config identical to Wan's, tiny test models still round-trip.

    Raises:
        CheckpointError: for a model the original layout cannot express.
    """
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    image_dim, pos_len = config.get("image_dim"), config.get("pos_embed_seq_len")
    if image_dim not in (None, _CLIP_DIM) or config.get("added_kv_proj_dim") not in (None, dim):
        raise CheckpointError("the original Wan layout only has 1280-d CLIP image conditioning")
    if pos_len not in (None, _FLF2V_TOKENS):
        raise CheckpointError(f"pos_embed_seq_len={pos_len} has no original Wan equivalent")
    model_type = "t2v" if image_dim is None else ("flf2v" if pos_len else "i2v")
    out: dict[str, Any] = {
        "_class_name": "WanModel",
        "model_type": model_type,
        "text_len": ORIGINAL_DEFAULTS["text_len"],
        "in_dim": config["in_channels"],
        "dim": dim,
        "ffn_dim": config["ffn_dim"],
        "freq_dim": config["freq_dim"],
        "out_dim": config["out_channels"],
        "num_heads": config["num_attention_heads"],
        "num_layers": config["num_layers"],
        "eps": config["eps"],
    }
    extras = {
        "patch_size": tuple(config["patch_size"]),
        "text_dim": config["text_dim"],
        "cross_attn_norm": bool(config["cross_attn_norm"]),
        "qk_norm": config.get("qk_norm") is not None,
    }
    out |= {k: v for k, v in extras.items() if v != ORIGINAL_DEFAULTS[k]}
    if config.get("rope_max_seq_len", _DEFAULT_ROPE_LEN) != _DEFAULT_ROPE_LEN:
        out["rope_max_seq_len"] = config["rope_max_seq_len"]
    return out


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Size:
    if key not in state_dict:
        raise CheckpointError(f"cannot infer the Wan config: the checkpoint has no {key!r}")
    return state_dict[key].shape


def infer_wan_config(
    state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None = None
) -> dict[str, Any]:
    """Infer `WanTransformer3DModel` kwargs from diffusers-layout weight shapes.

    Everything but the head count follows from shapes; heads come from `num_attention_heads`
    or, when None, from `KNOWN_HEADS`. `eps` and `rope_max_seq_len` leave no trace in the
    weights and take Wan's values.

    Raises:
        CheckpointError: if a needed key is absent or the head count cannot be determined.
    """
    config = _infer_from_shapes(state_dict)
    inner = config.pop("inner_dim")
    heads = num_attention_heads or KNOWN_HEADS.get(inner)
    if heads is None:
        raise CheckpointError(
            f"cannot infer num_attention_heads for inner dim {inner} (weight shapes do not "
            f"encode it; known Wan widths: {KNOWN_HEADS}). Pass config= with "
            f"num_attention_heads (attention_head_dim = inner dim / heads); "
            f"the rest was inferred as {config}"
        )
    if inner % heads:
        raise CheckpointError(f"inner dim {inner} is not divisible by {heads} heads")
    return {"num_attention_heads": heads, "attention_head_dim": inner // heads, **config}


def _infer_from_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """All `WanTransformer3DModel` kwargs readable from shapes, plus `inner_dim`."""
    inner, in_channels, *patch = _shape(state_dict, "patch_embedding.weight")
    blocks = {int(m[1]) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k))}
    image_norm = "condition_embedder.image_embedder.norm1.weight"
    pos_embed = "condition_embedder.image_embedder.pos_embed"
    added_kv = "blocks.0.attn2.add_k_proj.weight"
    return {
        "inner_dim": inner,
        "patch_size": tuple(patch),
        "in_channels": in_channels,
        "out_channels": _shape(state_dict, "proj_out.weight")[0] // math.prod(patch),
        "text_dim": _shape(state_dict, "condition_embedder.text_embedder.linear_1.weight")[1],
        "freq_dim": _shape(state_dict, "condition_embedder.time_embedder.linear_1.weight")[1],
        "ffn_dim": _shape(state_dict, "blocks.0.ffn.net.0.proj.weight")[0],
        "num_layers": max(blocks) + 1 if blocks else 0,
        "cross_attn_norm": "blocks.0.norm2.weight" in state_dict,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": state_dict[image_norm].shape[0] if image_norm in state_dict else None,
        "added_kv_proj_dim": state_dict[added_kv].shape[1] if added_kv in state_dict else None,
        "rope_max_seq_len": _DEFAULT_ROPE_LEN,
        "pos_embed_seq_len": state_dict[pos_embed].shape[1] if pos_embed in state_dict else None,
    }


def config_hints(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[str]:
    """Name the config fields whose value disagrees with what the weight shapes say.

    Best effort, for error messages: returns [] when the weights are too incomplete to read.
    """
    try:
        found = _infer_from_shapes(state_dict)
    except CheckpointError:
        return []
    hints = []
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    if found["inner_dim"] != inner:
        hints.append(
            f"num_attention_heads * attention_head_dim (checkpoint inner dim "
            f"{found['inner_dim']}, config {inner})"
        )
    for field in _SHAPE_FIELDS:
        want = tuple(config[field]) if field == "patch_size" else config[field]
        if found[field] != want:
            hints.append(f"{field} (checkpoint {found[field]!r}, config {want!r})")
    return hints


_SHAPE_FIELDS = (
    "num_layers",
    "patch_size",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "cross_attn_norm",
    "image_dim",
    "added_kv_proj_dim",
    "pos_embed_seq_len",
)
