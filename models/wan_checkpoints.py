"""Load causal Wan generators and the Wan VAE from every checkpoint format users bring.

The model classes are diffusers' own `WanTransformer3DModel` and `AutoencoderKLWan`.
Formats (ALGORITHMS.md §4):

    path                                       config from              key layout
    -----------------------------------------  -----------------------  --------------------
    diffusers model dir, or pipeline dir with  config.json              diffusers
      transformer/ (vae/), sharded or not
    original Wan dir                           config.json (Wan names)  original
    generator .pt/.pth (Self-Forcing, CausVid, `config=` or inferred    original, `model.`
      Rolling/Reward Forcing, StreamDiffusionV2)                          prefix, FSDP infixes
    single .safetensors / Wan2.1_VAE.pth       `config=` or inferred    either

Every format takes the same path, so every format gets the same checks:

    read tensors -> strip wrapper prefixes -> detect key layout -> rename to diffusers
      -> build the model on the meta device -> compare keys and shapes -> assign

Assigning into a meta-device model means no parameter is ever randomly initialised: a key the
checkpoint lacks is an error, not a silently random weight.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from streamrt.models.wan_keys import (
    CheckpointError,
    NonFiniteWeightsError,
    StateDict,
    config_hints,
    detect_transformer_layout,
    detect_vae_layout,
    diffusers_config_to_original,
    diffusers_to_original_wan,
    infer_wan_config,
    original_config_to_diffusers,
    original_to_diffusers_wan,
    strip_wrapper_prefixes,
)

__all__ = [
    "CheckpointError",
    "load_wan_transformer",
    "load_wan_vae",
    "save_generator_pt",
    "save_original_wan",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
ModelT = TypeVar("ModelT", WanTransformer3DModel, AutoencoderKLWan)

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Generic containers, tried after `generator_ema` / `generator`.
_CONTAINER_KEYS = ("model", "state_dict", "module")
_MAX_LISTED = 10
_ALIGNMENT = 64  # bytes; what PyTorch's CPU allocator guarantees


def load_wan_transformer(
    path: PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    prefer_ema: bool = True,
) -> WanTransformer3DModel:
    """Load a Wan (causal) generator from any supported checkpoint format.

    Args:
        path: A diffusers model or pipeline dir, an original Wan dir, a generator `.pt`/`.pth`,
            or a single `.safetensors` file.
        config: `WanTransformer3DModel` kwargs. They override a config.json found next to the
            weights; without one, fields not given are inferred from weight shapes.
        dtype: Floating dtype of the weights; like diffusers, the model's
            `_keep_in_fp32_modules` (norms, modulation, time embedder) stay in float32.
        device: Device the model ends up on.
        prefer_ema: For training checkpoints holding both, take `generator_ema` over `generator`.

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: if the path is missing, a file is corrupt, the key layout is unknown,
            or the checkpoint does not match the config.
    """
    files, file_config = _locate(path, "transformer")
    with _naming(str(path)):
        state_dict = strip_wrapper_prefixes(_read_weights(files, prefer_ema))
        if detect_transformer_layout(state_dict) == "original":
            state_dict = original_to_diffusers_wan(state_dict)
        kwargs = _transformer_kwargs(file_config, config, state_dict)
        model = _assign(WanTransformer3DModel, kwargs, state_dict, dtype, config_hints)
        # The RoPE tables are non-persistent buffers: no checkpoint holds them, so they are
        # computed here for real instead of staying on the meta device.
        c = model.config
        model.rope = WanRotaryPosEmbed(c.attention_head_dim, c.patch_size, c.rope_max_seq_len)
        _check_materialized(model)
        check_finite(model, str(path))
    return model.to(device).eval()


def load_wan_vae(
    path: PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AutoencoderKLWan:
    """Load the Wan2.1 VAE from a diffusers dir (or pipeline dir with vae/) or `Wan2.1_VAE.pth`.

    Args:
        path: A diffusers `AutoencoderKLWan` dir, a pipeline dir, or a `.pth`/`.safetensors`
            file in either key layout.
        config: `AutoencoderKLWan` kwargs, overriding config.json; a bare file without
            `config` gets diffusers' defaults, which are the Wan2.1 VAE's.
        dtype: Floating dtype of the weights.
        device: Device the model ends up on.

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: as for `load_wan_transformer`.
    """
    files, file_config = _locate(path, "vae")
    with _naming(str(path)):
        state_dict = strip_wrapper_prefixes(_read_weights(files, prefer_ema=True))
        if detect_vae_layout(state_dict) == "original":
            state_dict = convert_wan_vae_to_diffusers(state_dict)
        kwargs = _known_fields(AutoencoderKLWan, file_config or {})
        kwargs |= _validated(AutoencoderKLWan, config or {})
        model = _assign(AutoencoderKLWan, kwargs, state_dict, dtype, _vae_hints)
        _check_materialized(model)
        check_finite(model, str(path))
    return model.to(device).eval()


def save_original_wan(model: WanTransformer3DModel, directory: PathLike) -> None:
    """Write `model` as an original Wan dir: config.json in Wan's field names + safetensors.

    Raises:
        CheckpointError: if the model has no original-layout equivalent.
    """
    directory = Path(directory)
    config = diffusers_config_to_original(model.config)
    weights = diffusers_to_original_wan(_plain(model.state_dict()))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    safetensors.torch.save_file(
        weights, directory / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"}
    )


def save_generator_pt(
    model: WanTransformer3DModel,
    path: PathLike,
    key: str | None = "generator_ema",
    prefix: str = "model.",
) -> None:
    """Write `model` the way causal-video training repos save their generator.

    Args:
        model: The transformer to save.
        path: Output `.pt` file.
        key: Top-level dict key (`generator_ema`, `generator`, ...); None writes a bare
            state dict.
        prefix: Prepended to every original-layout parameter name.
    """
    weights = diffusers_to_original_wan(_plain(model.state_dict()))
    weights = {prefix + k: v for k, v in weights.items()}
    torch.save(weights if key is None else {key: weights}, path)


# ---------------------------------------------------------------- locating and reading


@contextlib.contextmanager
def _naming(source: str) -> Iterator[None]:
    """Prefix CheckpointErrors with the checkpoint they concern, unless they already name it."""
    try:
        yield
    except CheckpointError as error:
        if str(error).startswith(source):
            raise
        raise CheckpointError(f"{source}: {error}") from error


def _locate(path: PathLike, subfolder: str) -> tuple[list[Path], dict[str, Any] | None]:
    """Weight files and config.json contents (None for bare files) for `path`."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory")
    if root.is_file():
        return [root], None
    # A pipeline dir (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) keeps each model in a subfolder.
    if (root / subfolder).is_dir() and not (root / "config.json").is_file():
        root = root / subfolder
    config_path = root / "config.json"
    config = _read_json(config_path) if config_path.is_file() else None
    return _weight_files(root), config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable JSON ({error})") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a model dir: an index's shards, safetensors, or one torch file."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{directory}: several shard indexes {[p.name for p in indexes]}")
    if indexes:
        weight_map = _read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{indexes[0]}: no 'weight_map'")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        if absent := [f.name for f in files if not f.is_file()]:
            raise CheckpointError(f"{indexes[0]}: shard file(s) missing: {absent}")
        return files
    single = directory / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return [single]
    if shards := sorted(directory.glob("*.safetensors")):
        return shards
    torch_files = sorted(p for p in directory.iterdir() if p.suffix in _TORCH_SUFFIXES)
    if len(torch_files) == 1:
        return torch_files
    if torch_files:
        names = [p.name for p in torch_files]
        raise CheckpointError(f"{directory}: several checkpoints {names}; pass one file")
    raise CheckpointError(f"{directory}: no *.safetensors, *.pt, *.pth or *.bin weights")


def _read_weights(files: list[Path], prefer_ema: bool) -> StateDict:
    """Merge the tensors of all files; a key in two shards is an error, not an overwrite."""
    merged: StateDict = {}
    for file in files:
        part = _read_file(file, prefer_ema)
        if overlap := merged.keys() & part.keys():
            raise CheckpointError(f"{file}: keys also in another shard: {sorted(overlap)[:5]}")
        merged |= part
    return merged


def _read_file(file: Path, prefer_ema: bool) -> StateDict:
    if file.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(file, device="cpu")
        # safetensors raises SafetensorError, OSError or others depending on where the file
        # is cut; all of them mean the same thing to the user.
        except Exception as error:
            raise CheckpointError(
                f"{file}: corrupt or truncated safetensors file ({type(error).__name__}: {error})"
            ) from error
    if file.suffix in _TORCH_SUFFIXES:
        return _select_weights(_torch_load(file), prefer_ema, str(file))
    raise CheckpointError(f"{file}: unknown file type (expected .safetensors or .pt/.pth/.bin)")


def _torch_load(file: Path) -> Any:
    """`torch.load` that never runs pickled code and names the file in every failure."""
    try:
        # mmap avoids a second in-memory copy of multi-GB generators; it needs the zip format.
        return torch.load(
            file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file)
        )
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            detail = next((ln for ln in str(error).splitlines() if "GLOBAL" in ln), "")
            raise CheckpointError(
                f"{file}: holds objects other than tensors and plain containers, which "
                f"torch.load(weights_only=True) refuses to unpickle. {detail.strip()} "
                "Re-save the weights as a plain state dict or as safetensors."
            ) from error
        raise CheckpointError(f"{file}: corrupt or truncated torch checkpoint ({error})") from error
    except Exception as error:
        first = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"{file}: corrupt or truncated torch checkpoint ({type(error).__name__}: {first})"
        ) from error


def _select_weights(obj: Any, prefer_ema: bool, source: str, depth: int = 0) -> StateDict:
    """Find the generator's state dict inside what a training script saved."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    generators = ("generator_ema", "generator") if prefer_ema else ("generator", "generator_ema")
    for key in (*generators, *_CONTAINER_KEYS):
        inner = obj.get(key)
        # An EMA that was never enabled is saved as None or {}: fall through to `generator`.
        if isinstance(inner, Mapping) and inner and depth < 3:
            logger.info("%s: loading the weights under %r", source, key)
            return _select_weights(inner, prefer_ema, f"{source}[{key!r}]", depth + 1)
    keys = [str(k) for k in itertools.islice(obj, _MAX_LISTED)]
    raise CheckpointError(
        f"{source}: no weights found; expected a state dict or a dict with one of "
        f"{(*generators, *_CONTAINER_KEYS)}; top-level keys: {keys}"
    )


# ---------------------------------------------------------------- config and assignment


def _init_fields(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _known_fields(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a config.json that `cls` takes (drops `_class_name` and the like)."""
    fields = _init_fields(cls)
    return {k: v for k, v in config.items() if k in fields}


def _validated(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """A user-given config, refused if it names fields `cls` does not have (typos)."""
    if unknown := sorted(set(config) - _init_fields(cls)):
        raise CheckpointError(f"unknown {cls.__name__} config field(s): {unknown}")
    return dict(config)


def _transformer_kwargs(
    file_config: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
    state_dict: StateDict,
) -> dict[str, Any]:
    """Config.json (either naming), else shapes, overridden by the user's `config`."""
    user = _validated(WanTransformer3DModel, config or {})
    if file_config is None:
        try:
            base = infer_wan_config(state_dict, user.get("num_attention_heads"))
        except CheckpointError:
            if config is None:
                raise
            base = {}  # the key/shape check reports whatever the user's config gets wrong
    elif "dim" in file_config and "num_heads" in file_config:
        base = original_config_to_diffusers(file_config)
    else:
        base = _known_fields(WanTransformer3DModel, file_config)
    return base | user


def _assign(
    cls: type[ModelT],
    kwargs: dict[str, Any],
    state_dict: StateDict,
    dtype: torch.dtype,
    hints: Callable[[StateDict, Mapping[str, Any]], list[str]],
) -> ModelT:
    """Build `cls` on the meta device and assign `state_dict` into it after checking it."""
    with torch.device("meta"):
        model = cls.from_config(kwargs)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    # Keys diffusers itself skips on load (e.g. `norm_added_q` in early Wan I2V exports); the
    # model has no slot for them, so dropping them leaves nothing uninitialised.
    ignored = [re.compile(p) for p in cls._keys_to_ignore_on_load_unexpected or []]
    state_dict = {
        k: v
        for k, v in state_dict.items()
        if k in expected or not any(p.search(k) for p in ignored)
    }
    _check_match(cls.__name__, expected, state_dict, lambda: hints(state_dict, model.config))
    keep_fp32 = set(cls._keep_in_fp32_modules or [])
    state_dict = {k: _cast(k, v, dtype, keep_fp32) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def cast_like_diffusers(model: torch.nn.Module, dtype: str | torch.dtype) -> torch.nn.Module:
    """Cast a built model's parameters in place as loading does (`_cast`): floating
    parameters to `dtype`, the class's `_keep_in_fp32_modules` stay float32."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    keep_fp32 = set(getattr(type(model), "_keep_in_fp32_modules", None) or [])
    for name, param in model.named_parameters():
        if param.is_floating_point():
            param.data = param.data.to(
                torch.float32 if keep_fp32.intersection(name.split(".")) else dtype
            )
    return model


def _cast(key: str, value: torch.Tensor, dtype: torch.dtype, keep_fp32: set[str]) -> torch.Tensor:
    """Cast like diffusers' `from_pretrained`: `_keep_in_fp32_modules` name components stay fp32.

    safetensors hands out views into one file buffer at arbitrary offsets. CPU kernels take
    different vectorised paths for unaligned data, so such a view gives last-bit differences
    from the same weights loaded any other way (and runs slower); those are copied into
    PyTorch's 64-byte-aligned allocations.
    """
    if value.is_floating_point():
        value = value.to(torch.float32 if keep_fp32.intersection(key.split(".")) else dtype)
    return value.clone() if value.data_ptr() % _ALIGNMENT else value


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    more = f" ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return [f"{title} ({len(items)}): " + ", ".join(items[:_MAX_LISTED]) + more]


def _check_match(
    name: str,
    expected: Mapping[str, torch.Size],
    state_dict: StateDict,
    hints: Callable[[], list[str]],
) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped key."""
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(expected.keys() & state_dict.keys())
        if state_dict[k].shape != expected[k]
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"checkpoint does not match the {name} config"]
    lines += _listing("missing keys", missing)
    lines += _listing("unexpected keys", unexpected)
    lines += _listing("shape mismatches", shapes)
    if fields := hints():
        lines.append("likely differing config field(s): " + "; ".join(fields))
    raise CheckpointError("\n  ".join(lines))


def _vae_hints(state_dict: StateDict, config: Mapping[str, Any]) -> list[str]:
    """Config fields of `AutoencoderKLWan` that disagree with the weight shapes."""
    readable = {"base_dim": "encoder.conv_in.weight", "z_dim": "post_quant_conv.weight"}
    hints = [
        f"{field} (checkpoint {state_dict[key].shape[0]}, config {config[field]})"
        for field, key in readable.items()
        if key in state_dict and state_dict[key].shape[0] != config[field]
    ]
    return hints or ["dim_mult / num_res_blocks / temperal_downsample / attn_scales"]


def check_finite(model: torch.nn.Module, source: str) -> None:
    """Raise a `NonFiniteWeightsError` naming the first tensors holding NaN or infinity
    (such weights make every frame black or NaN instead of failing)."""
    bad = [
        name
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise NonFiniteWeightsError(
            f"{source}: weights hold NaN or infinity in {len(bad)} tensor(s), e.g. {bad[:3]}; "
            "the checkpoint is broken (a diverged training run or a bad conversion): use "
            "another checkpoint or re-export it"
        )


def _check_materialized(model: torch.nn.Module) -> None:
    """Invariant: nothing is left on the meta device (a new non-persistent buffer would be)."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    if left := [name for name, t in tensors if t.is_meta]:
        raise CheckpointError(f"internal: {left[:5]} were never loaded")


def _plain(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Detached, contiguous CPU tensors, as safetensors requires."""
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
