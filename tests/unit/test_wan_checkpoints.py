"""Wan checkpoint loading: every format back to identical outputs, exact key inverses, errors."""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)

from streamrt.models.wan_checkpoints import (
    CheckpointError,
    load_wan_transformer,
    load_wan_vae,
    save_generator_pt,
    save_original_wan,
)
from streamrt.models.wan_keys import (
    diffusers_config_to_original,
    diffusers_to_original_wan,
    diffusers_to_original_wan_vae,
    infer_wan_config,
    original_config_to_diffusers,
    original_to_diffusers_wan,
)

# attention_head_dim=12 splits into RoPE parts t=4, h=4, w=4 (WanRotaryPosEmbed).
TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    rope_max_seq_len=32,
)
# The Wan2.1 VAE topology (4 stages, 2 res blocks) at base_dim 8: diffusers' VAE converter
# hard-codes that topology, so a smaller dim_mult or num_res_blocks would not convert.
TINY_VAE = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 4,
    latents_std=[1.0] * 4,
)
# config.json of Wan-AI/Wan2.1-T2V-1.3B as released.
WAN_1_3B_ORIGINAL = {
    "_class_name": "WanModel",
    "_diffusers_version": "0.30.0",
    "dim": 1536,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "in_dim": 16,
    "model_type": "t2v",
    "num_heads": 12,
    "num_layers": 30,
    "out_dim": 16,
    "text_len": 512,
}
# The transformer/config.json fields of Wan-AI/Wan2.1-T2V-1.3B-Diffusers.
WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
    pos_embed_seq_len=None,
)


def _tiny(seed: int = 0, **overrides: Any) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY, **overrides}).eval()


def _kwargs(config: Any) -> dict[str, Any]:
    """The init kwargs of a model config, patch_size normalised (JSON turns it into a list)."""
    out = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    out["patch_size"] = tuple(out["patch_size"])
    return out


@pytest.fixture(scope="module")
def model() -> WanTransformer3DModel:
    return _tiny()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, 2, 8, 8, generator=g)
    text = torch.randn(1, 5, 16, generator=g)
    return hidden, torch.tensor([637.0]), text


@torch.no_grad()
def _forward(model: WanTransformer3DModel, inputs) -> torch.Tensor:
    hidden, timestep, text = inputs
    return model(hidden, timestep, text, return_dict=False)[0]


def _original_sd(model: WanTransformer3DModel) -> dict[str, torch.Tensor]:
    return diffusers_to_original_wan(model.state_dict())


def _diffusers_dir(model: WanTransformer3DModel, d: Path) -> Path:
    model.save_pretrained(d)
    return d


def _diffusers_sharded(model: WanTransformer3DModel, d: Path) -> Path:
    model.save_pretrained(d, max_shard_size="10KB")
    assert len(list(d.glob("*.safetensors"))) > 1
    assert (d / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return d


def _pipeline_dir(model: WanTransformer3DModel, d: Path) -> Path:
    """Wan-AI/Wan2.1-T2V-1.3B-Diffusers layout, reduced to the transformer."""
    model.save_pretrained(d / "transformer")
    (d / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return d


def _original_dir(model: WanTransformer3DModel, d: Path) -> Path:
    save_original_wan(model, d)
    return d


def _pt_generator(model: WanTransformer3DModel, d: Path) -> Path:
    save_generator_pt(model, d / "g.pt", key="generator", prefix="")
    return d / "g.pt"


def _pt_generator_ema(model: WanTransformer3DModel, d: Path) -> Path:
    """Self-Forcing / Rolling Forcing / Reward Forcing: `generator_ema`, `model.` prefix."""
    save_generator_pt(model, d / "self_forcing_dmd.pt")
    return d / "self_forcing_dmd.pt"


def _pt_bare(model: WanTransformer3DModel, d: Path) -> Path:
    save_generator_pt(model, d / "model.pth", key=None)
    return d / "model.pth"


def _pt_in_dir(model: WanTransformer3DModel, d: Path) -> Path:
    """StreamDiffusionV2 / CausVid: a folder holding one `model.pt`, no prefix."""
    save_generator_pt(model, d / "model.pt", key="generator", prefix="")
    return d


def _pt_fsdp(model: WanTransformer3DModel, d: Path) -> Path:
    """Names as an FSDP + torch.compile training run saves them."""
    names = {
        "_orig_mod.model." + re.sub(r"^blocks\.(\d+)\.", r"blocks.\1._fsdp_wrapped_module.", k): v
        for k, v in _original_sd(model).items()
    }
    torch.save({"state_dict": names}, d / "fsdp.pt")
    return d / "fsdp.pt"


def _safetensors_original(model: WanTransformer3DModel, d: Path) -> Path:
    safetensors.torch.save_file(_original_sd(model), d / "wan.safetensors")
    return d / "wan.safetensors"


def _safetensors_diffusers(model: WanTransformer3DModel, d: Path) -> Path:
    safetensors.torch.save_file(model.state_dict(), d / "wan.safetensors")
    return d / "wan.safetensors"


# writer -> whether a config.json travels with the weights
FORMATS: dict[Callable[[WanTransformer3DModel, Path], Path], bool] = {
    _diffusers_dir: True,
    _diffusers_sharded: True,
    _pipeline_dir: True,
    _original_dir: True,
    _pt_generator: False,
    _pt_generator_ema: False,
    _pt_bare: False,
    _pt_in_dir: False,
    _pt_fsdp: False,
    _safetensors_original: False,
    _safetensors_diffusers: False,
}


@pytest.mark.parametrize("write", list(FORMATS), ids=lambda w: w.__name__.lstrip("_"))
def test_every_format_loads_back_to_identical_outputs(write, model, inputs, tmp_path):
    path = write(model, tmp_path)
    loaded = load_wan_transformer(path, None if FORMATS[write] else TINY)
    assert _kwargs(loaded.config) == _kwargs(model.config)
    assert not loaded.training
    assert torch.equal(_forward(loaded, inputs), _forward(model, inputs))


def test_partial_config_gets_the_rest_from_shapes(model, inputs, tmp_path):
    save_generator_pt(model, tmp_path / "g.pt")
    loaded = load_wan_transformer(tmp_path / "g.pt", {"num_attention_heads": 2})
    # rope_max_seq_len leaves no trace in the weights, so Wan's 1024 is taken; the RoPE rows
    # for the positions in use are the same either way.
    assert _kwargs(loaded.config) == {**_kwargs(model.config), "rope_max_seq_len": 1024}
    assert torch.equal(_forward(loaded, inputs), _forward(model, inputs))


def test_prefer_ema_picks_generator_ema_unless_told_or_empty(inputs, tmp_path):
    online, ema = _tiny(seed=0), _tiny(seed=1)
    both = {"generator": _original_sd(online), "generator_ema": _original_sd(ema), "step": 7}
    torch.save(both, tmp_path / "both.pt")
    torch.save({**both, "generator_ema": {}}, tmp_path / "no_ema.pt")

    def out(name: str, **kw) -> torch.Tensor:
        return _forward(load_wan_transformer(tmp_path / name, TINY, **kw), inputs)

    assert torch.equal(out("both.pt"), _forward(ema, inputs))
    assert torch.equal(out("both.pt", prefer_ema=False), _forward(online, inputs))
    assert torch.equal(out("no_ema.pt"), _forward(online, inputs))


def test_bf16_keeps_diffusers_fp32_modules(model, tmp_path):
    model.save_pretrained(tmp_path)
    sd = load_wan_transformer(tmp_path, dtype=torch.bfloat16).state_dict()
    assert sd["patch_embedding.weight"].dtype == torch.bfloat16
    assert sd["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    for fp32 in ("scale_shift_table", "blocks.0.norm2.weight", "blocks.1.scale_shift_table"):
        assert sd[fp32].dtype == torch.float32
        assert torch.equal(sd[fp32], model.state_dict()[fp32])
    assert sd["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float32


# ---------------------------------------------------------------- key and config mapping


@pytest.mark.parametrize(
    "overrides", [{}, {"image_dim": 8, "added_kv_proj_dim": 24}], ids=["t2v", "i2v"]
)
def test_inverse_round_trips_exactly_against_diffusers(overrides):
    sd = _tiny(**overrides).state_dict()
    original = diffusers_to_original_wan(sd)
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert back.keys() == sd.keys()
    assert all(back[k] is sd[k] for k in sd)
    again = diffusers_to_original_wan(original_to_diffusers_wan(original))
    assert again.keys() == original.keys() and all(again[k] is original[k] for k in original)
    # Names as in Wan-Video/Wan2.1 wan/modules/model.py.
    expected = {
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "time_embedding.2.bias",
        "time_projection.1.weight",
        "blocks.1.self_attn.q.weight",
        "blocks.1.self_attn.norm_k.weight",
        "blocks.0.cross_attn.o.bias",
        "blocks.0.norm3.weight",  # diffusers' norm2: the affine cross-attention norm
        "blocks.0.ffn.0.weight",
        "blocks.0.ffn.2.bias",
        "blocks.0.modulation",
        "head.head.weight",
        "head.modulation",
    }
    if overrides:
        expected |= {"blocks.0.cross_attn.k_img.weight", "blocks.0.cross_attn.norm_k_img.weight"}
        expected |= {"img_emb.proj.0.weight", "img_emb.proj.1.weight", "img_emb.proj.4.bias"}
    assert expected <= original.keys()


def test_flf2v_position_embedding_round_trips():
    sd = _tiny(image_dim=8, added_kv_proj_dim=24, pos_embed_seq_len=4).state_dict()
    original = diffusers_to_original_wan(sd)
    assert "img_emb.emb_pos" in original
    back = original_to_diffusers_wan(original)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


def test_released_original_config_maps_to_the_diffusers_config():
    assert original_config_to_diffusers(WAN_1_3B_ORIGINAL) == WAN_1_3B
    expected = {k: v for k, v in WAN_1_3B_ORIGINAL.items() if k != "_diffusers_version"}
    assert diffusers_config_to_original(WAN_1_3B) == expected
    tiny = _kwargs(_tiny().config)
    assert original_config_to_diffusers(diffusers_config_to_original(tiny)) == tiny


@pytest.mark.parametrize(
    "config",
    [
        WAN_1_3B,
        {**WAN_1_3B, "num_attention_heads": 24, "in_channels": 48, "out_channels": 48,
         "ffn_dim": 14336},  # Wan2.2 TI2V-5B
        {**WAN_1_3B, "num_attention_heads": 40, "in_channels": 36, "ffn_dim": 13824,
         "num_layers": 40, "image_dim": 1280, "added_kv_proj_dim": 5120},  # Wan2.1 I2V-14B
    ],
    ids=["1.3B", "5B", "14B-i2v"],
)  # fmt: skip
def test_inferred_config_equals_true_config_for_released_sizes(config):
    with torch.device("meta"):  # shapes only: no memory for the real sizes
        shapes = WanTransformer3DModel(**config).state_dict()
    assert infer_wan_config(shapes) == config
    assert infer_wan_config(original_to_diffusers_wan(diffusers_to_original_wan(shapes))) == config


def test_unknown_width_asks_for_config(model, tmp_path):
    save_generator_pt(model, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match=r"num_attention_heads.*config=") as err:
        load_wan_transformer(tmp_path / "g.pt")
    assert "g.pt" in str(err.value) and "inner dim 24" in str(err.value)


# ---------------------------------------------------------------- errors


def test_extra_layers_list_unexpected_keys_and_name_num_layers(tmp_path):
    save_generator_pt(_tiny(num_layers=3), tmp_path / "three.pt")
    with pytest.raises(CheckpointError) as err:
        load_wan_transformer(tmp_path / "three.pt", TINY)
    msg = str(err.value)
    assert "three.pt" in msg
    assert "unexpected keys (27)" in msg and "blocks.2.attn1.to_q.weight" in msg
    assert "(+17 more)" in msg and "missing keys" not in msg
    assert "num_layers (checkpoint 3, config 2)" in msg


def test_missing_layers_list_missing_keys(model, tmp_path):
    save_generator_pt(model, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(27\): blocks\.2\.") as err:
        load_wan_transformer(tmp_path / "two.pt", {**TINY, "num_layers": 3})
    assert "num_layers (checkpoint 2, config 3)" in str(err.value)


def test_shape_mismatch_names_the_field(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_wan_transformer(tmp_path, {"ffn_dim": 40})
    msg = str(err.value)
    assert "shape mismatches (6)" in msg
    assert "blocks.0.ffn.net.0.proj.weight: checkpoint (32, 24) vs model (40, 24)" in msg
    assert "ffn_dim (checkpoint 32, config 40)" in msg


@pytest.mark.parametrize("name", ["w.safetensors", "g.pt"])
def test_truncated_file_is_named(name, model, tmp_path):
    path = tmp_path / name
    if name.endswith(".pt"):
        save_generator_pt(model, path)
    else:
        safetensors.torch.save_file(model.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        load_wan_transformer(path, TINY)
    assert str(path) in str(err.value)


class _RunsCode:
    """Unpickling this touches a file, so a test can see whether pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickled_objects_are_refused_without_running_them(model, tmp_path):
    marker = tmp_path / "code_ran"
    ckpt = {"generator": _original_sd(model), "extra": _RunsCode(marker)}
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"weights_only=True") as err:
        load_wan_transformer(tmp_path / "evil.pt", TINY)
    assert "evil.pt" in str(err.value)
    assert not marker.exists()


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_wan_transformer(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=r"no .*weights"):
        load_wan_transformer(tmp_path)


def test_unknown_layout(tmp_path):
    safetensors.torch.save_file({"encoder.conv.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_wan_transformer(tmp_path / "x.safetensors", TINY)
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "step": 3}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match=r"no weights found.*'optimizer'"):
        load_wan_transformer(tmp_path / "opt.pt", TINY)


def test_config_typo_is_refused(model, tmp_path):
    save_generator_pt(model, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="num_heads"):
        load_wan_transformer(tmp_path / "g.pt", {**TINY, "num_heads": 2})


# ---------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(**TINY_VAE).eval()


@torch.no_grad()
def _reconstruct(vae: AutoencoderKLWan) -> torch.Tensor:
    video = torch.randn(1, 3, 5, 8, 8, generator=torch.Generator().manual_seed(2))
    return vae(video).sample  # posterior mode: deterministic


def test_vae_inverse_round_trips_exactly(vae):
    sd = vae.state_dict()
    original = diffusers_to_original_wan_vae(sd)
    back = convert_wan_vae_to_diffusers(original)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)
    # Names as in Wan-Video/Wan2.1 wan/modules/vae.py.
    assert {
        "conv1.weight",
        "conv2.bias",
        "encoder.conv1.weight",
        "encoder.downsamples.3.shortcut.weight",
        "encoder.middle.1.to_qkv.weight",
        "decoder.middle.2.residual.6.weight",
        "decoder.upsamples.3.resample.1.weight",
        "decoder.upsamples.4.shortcut.weight",
        "decoder.upsamples.14.residual.0.gamma",
        "decoder.head.2.weight",
    } <= original.keys()


def test_vae_loads_from_diffusers_pipeline_and_original_pth(vae, tmp_path):
    expected = _reconstruct(vae)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    torch.save(diffusers_to_original_wan_vae(vae.state_dict()), tmp_path / "Wan2.1_VAE.pth")
    for path, config in [
        (tmp_path / "pipe" / "vae", None),
        (tmp_path / "pipe", None),
        (tmp_path / "Wan2.1_VAE.pth", TINY_VAE),
    ]:
        loaded = load_wan_vae(path, config)
        assert torch.equal(_reconstruct(loaded), expected), path


def test_vae_mismatch_names_base_dim(vae, tmp_path):
    torch.save(diffusers_to_original_wan_vae(vae.state_dict()), tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match=r"base_dim \(checkpoint 8, config 16\)"):
        load_wan_vae(tmp_path / "vae.pth", {**TINY_VAE, "base_dim": 16})
