"""Video-LLM adapters: the stock transformers classes, seen through one small interface.

The QA runtime needs five things from a Video-LLM, whatever its family:

    frames  --encode_frames-->  frame block embeddings    [N, tokens_per_frame, hidden]
                                (per-frame wrapper text tokens + visual tokens, as the
                                 family's processor lays out an image; `use_frame_wrapper`)
    text    --embed_text----->  token embeddings          [n, hidden]
    embeds + positions + Cache  --forward-->  last hidden states (keys/values flow through the Cache)
    pre-RoPE keys  --rotate(positions)-->  keys as the model's attention expects them
    hidden  --logits-->  next-token logits

Nothing here forks model code. The runtime attaches to the language model through its
extension points only: a `transformers.Cache` it fills itself (see `streamrt.qa.context`)
and forward hooks on the attention projections (`k_proj`, `v_proj`, `q_proj`), which see
keys and queries *before* RoPE. Re-rotation at new positions calls the model's own
`rotary_emb` and its module's own `apply_rotary_pos_emb`, so any RoPE variant that those two
express (scaling, partial rotary) is handled by the model's code, not ours.

Supported: SmolVLM (Idefics3 vision + Llama text), LLaVA-OneVision (SigLIP + Qwen2 text,
video frames pooled 2x2), both with 1-D RoPE; Qwen2-VL / Qwen2.5-VL with 3-D M-RoPE
(positions are `[tokens, rope_axes]` throughout, see `Qwen2VLAdapter`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import AutoConfig

from streamrt.embedded import VQA_MODEL, resolve_model
from streamrt.errors import StreamrtError
from streamrt.models.text import quiet_loading


class VLMAdapter:
    """Common behaviour; subclasses say where the vision tower and the language model are.

    Args:
        model: A loaded `...ForConditionalGeneration` model (eval mode is set here).
        image_mean: Per-channel mean of the model's image normalisation.
        image_std: Per-channel std of the model's image normalisation.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[str] = ""
    rope_axes: ClassVar[int] = 1
    """Components of a token's RoPE position (1; 3 for M-RoPE: temporal, height, width)."""
    frame_wrapper: ClassVar[tuple[tuple[str, ...], tuple[str, ...]]] = ((), ())
    """Text tokens the family's processor puts before and after each image's visual tokens
    (used when the tokenizer has them, see `use_frame_wrapper`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        self.text_config = model.config.text_config
        tc = self.text_config
        self.num_layers = int(tc.num_hidden_layers)
        self.num_heads = int(tc.num_attention_heads)
        self.num_kv_heads = int(getattr(tc, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // self.num_heads)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        attn = self.attention_modules()[0]
        self._apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.frame_prefix: tuple[int, ...] = ()
        self.frame_suffix: tuple[int, ...] = ()
        self.visual_tokens = int(self._vision_features(self._blank()).shape[1])
        """Visual tokens per frame (the vision tower's output, without wrapper tokens)."""
        self.tokens_per_frame = self.visual_tokens
        """Tokens of one frame block: wrapper prefix + visual tokens + wrapper suffix."""

    # ------------------------------------------------------------------ per family

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings, layers, rotary_emb, final norm)."""
        raise NotImplementedError

    @property
    def image_size(self) -> tuple[int, int]:
        """Frame height and width the vision tower takes."""
        size = int(self.config.vision_config.image_size)
        return size, size

    def _vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None
    ) -> VLMAdapter:
        """Load the stock model class from a local directory (the real checkpoint path)."""
        import transformers

        model_cls = getattr(transformers, cls.model_class)
        with quiet_loading():
            model = model_cls.from_pretrained(path, dtype=dtype)
        if device is not None:
            model = model.to(device)
        mean, std = _image_normalisation(Path(path))
        return cls(model, mean, std)

    def attention_modules(self) -> list[torch.nn.Module]:
        """The `self_attn` module of each decoder layer, in layer order."""
        return [layer.self_attn for layer in self.language_model.layers]

    def pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8-range float frames `[N, H, W, 3]` in [0, 1] -> normalised `[N, 3, H, W]`."""
        x = frames.permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        return x.to(device=self.device, dtype=self.dtype)

    def use_frame_wrapper(self, tokenizer: Any) -> bool:
        """Wrap every frame block in the family's per-image text tokens (`frame_wrapper`,
        e.g. SmolVLM's `<fake_token_around_image><global-img> ... <fake_token_around_image>`)
        when `tokenizer` knows them, as the stock processor lays out an image; a frame
        block is then `prefix + visual tokens + suffix`. Returns whether it does."""
        vocab = tokenizer.get_vocab()
        before, after = self.frame_wrapper
        if not (before or after) or any(t not in vocab for t in (*before, *after)):
            return False
        self.frame_prefix = tuple(vocab[t] for t in before)
        self.frame_suffix = tuple(vocab[t] for t in after)
        self.tokens_per_frame = len(self.frame_prefix) + self.visual_tokens + len(self.frame_suffix)
        return True

    @torch.no_grad()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """Token embeddings of each frame block, `[N, tokens_per_frame, hidden]`."""
        return self.frame_features(pixels)

    def frame_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """`encode_frames` with gradients (training runs the same path)."""
        visual = self._vision_features(pixels)
        if not (self.frame_prefix or self.frame_suffix):
            return visual
        n = visual.shape[0]
        embed = self.language_model.get_input_embeddings()

        def wrap(ids: tuple[int, ...]) -> torch.Tensor:
            t = torch.tensor(ids, dtype=torch.long, device=self.device)
            return embed(t).to(visual.dtype)[None].expand(n, -1, -1)

        return torch.cat([wrap(self.frame_prefix), visual, wrap(self.frame_suffix)], dim=1)

    @torch.no_grad()
    def embed_text(self, ids: list[int]) -> torch.Tensor:
        """Input embeddings of token ids, `[n, hidden]`."""
        t = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self.language_model.get_input_embeddings()(t)

    def text_positions(self, n: int) -> torch.Tensor:
        """Position offsets `[n, rope_axes]` of `n` text tokens laid from 0."""
        return torch.arange(n).unsqueeze(1).expand(n, self.rope_axes)

    def frame_positions(self) -> torch.Tensor:
        """Position offsets `[tokens_per_frame, rope_axes]` of one frame block laid from 0:
        wrapper prefix like text, the visual tokens (`visual_positions`), the suffix like text
        after the visual tokens' span (the rule of `get_rope_index`)."""
        visual = self.visual_positions()
        pre, post = len(self.frame_prefix), len(self.frame_suffix)
        span = int(visual.max()) + 1
        return torch.cat(
            [
                self.text_positions(pre),
                visual + pre,
                self.text_positions(post) + pre + span,
            ]
        )

    def visual_positions(self) -> torch.Tensor:
        """Position offsets `[visual_tokens, rope_axes]` of a frame's visual tokens from 0."""
        return self.text_positions(self.visual_tokens)

    def _position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """`[n, rope_axes]` -> the `position_ids` layout the language model takes."""
        return positions.to(self.device).T[:, None, :].squeeze(0)

    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """Run the decoder over `embeds` `[n, hidden]` at `positions` `[n, rope_axes]`,
        attending to whatever `cache` holds; returns the last hidden states `[n, hidden]`."""
        out = self.language_model(
            inputs_embeds=embeds[None],
            position_ids=self._position_ids(positions),
            cache=cache,
            use_cache=True,
        )
        return out.last_hidden_state[0]

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits `[n, vocab]` (float32) from last hidden states."""
        return self.model.lm_head(hidden).float()

    @torch.no_grad()
    def rotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply the model's RoPE to pre-RoPE keys `[n, H, D]` at `positions` `[n, rope_axes]`;
        returns `[1, H, n, D]`, the layout a transformers Cache hands to attention."""
        k = keys.to(self.dtype).transpose(0, 1)[None]
        cos, sin = self.language_model.rotary_emb(k, self._position_ids(positions))
        _, rotated = self._apply_rope(k, k, cos, sin)
        return rotated

    def fingerprint(self) -> dict[str, Any]:
        """What a saved memory must match to be served by this model."""
        return {
            "model_type": self.config.model_type,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "tokens_per_frame": self.tokens_per_frame,
            "hidden_size": int(self.text_config.hidden_size),
            "vocab_size": int(self.text_config.vocab_size),
        }

    def _blank(self) -> torch.Tensor:
        h, w = self.image_size
        return torch.zeros(1, 3, h, w, device=self.device, dtype=self.dtype)


class SmolVLMAdapter(VLMAdapter):
    """SmolVLM: SigLIP-style tower + pixel-shuffle connector; Llama text model."""

    model_types = ("smolvlm", "idefics3")
    model_class = "SmolVLMForConditionalGeneration"
    frame_wrapper = (("<fake_token_around_image>", "<global-img>"), ("<fake_token_around_image>",))

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.text_model

    def _vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.model.get_image_features(pixels[None], return_dict=True)
        feats = out.pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return feats.reshape(pixels.shape[0], -1, feats.shape[-1])


class LlavaOnevisionAdapter(VLMAdapter):
    """LLaVA-OneVision: SigLIP tower + projector, video frames pooled 2x2; Qwen2 text model.

    The stock video path appends one `image_newline` token after all frames of a clip; a
    live stream has no end, so a frame's block holds only its pooled tokens. Its processor
    puts no text tokens around a frame (the clip's `<video>` tokens form one run), so
    there is no `frame_wrapper`.
    """

    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def _vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        out = self.model.model.get_video_features(
            pixels[None],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
        feats = out.pooler_output[0, :-1]  # drop the clip-final image_newline
        return feats.reshape(pixels.shape[0], -1, feats.shape[-1])


class Qwen2VLAdapter(VLMAdapter):
    """Qwen2-VL / Qwen2.5-VL: a ViT over 2-frame temporal patches; 3-D M-RoPE text model.

    A live frame is encoded as one image (the stock image path: the frame repeated over
    the temporal patch), at a fixed square size `patch * merge * FRAME_GRID`. M-RoPE: a
    frame's tokens sit at `(s, s + row, s + col)` (from the model's `get_vision_position_ids`)
    and the next block starts at `s + max(rows, cols)`, exactly as `get_rope_index` lays
    an image between text; text tokens advance all three axes together. The rotary
    embedding recombines the sections (`mrope_section`) itself, so re-rotating a stored
    frame at a new start `s` is one call of `rotary_emb` with 3-D position ids.
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    model_class = "AutoModelForImageTextToText"
    frame_wrapper = (("<|vision_start|>",), ("<|vision_end|>",))
    rope_axes = 3
    FRAME_GRID = 8
    """Merged tokens per side of a frame (64 tokens per frame)."""

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None
    ) -> VLMAdapter:
        from transformers import AutoModelForImageTextToText

        with quiet_loading():
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        if device is not None:
            model = model.to(device)
        clip_mean = (0.48145466, 0.4578275, 0.40821073)
        clip_std = (0.26862954, 0.26130258, 0.27577711)
        mean, std = _image_normalisation(Path(path), (clip_mean, clip_std))
        return cls(model, mean, std)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def image_size(self) -> tuple[int, int]:
        vc = self.config.vision_config
        side = int(vc.patch_size) * int(vc.spatial_merge_size) * self.FRAME_GRID
        return side, side

    def _grid(self) -> torch.Tensor:
        patch = int(self.config.vision_config.patch_size)
        h, w = self.image_size
        return torch.tensor([1, h // patch, w // patch])

    def _vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        vc = self.config.vision_config
        patches = _qwen_patchify(
            pixels, int(vc.patch_size), int(vc.spatial_merge_size), int(vc.temporal_patch_size)
        )
        grid = self._grid().to(self.device).repeat(pixels.shape[0], 1)
        out = self.model.model.get_image_features(patches, image_grid_thw=grid, return_dict=True)
        return torch.stack(list(out.pooler_output))

    def visual_positions(self) -> torch.Tensor:
        merge = int(self.config.vision_config.spatial_merge_size)
        ids = self.model.model.get_vision_position_ids(0, self._grid(), 1, merge, device="cpu")
        return ids.T.long()


def _qwen_patchify(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """`[N, C, H, W]` -> `[N * grid_h * grid_w, C * temporal * patch * patch]`, the layout of
    Qwen2-VL's image processor (`patchify`): merge-window-major patches, each image repeated
    over the temporal patch."""
    n, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(n, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [n, gh/m, gw/m, m, m, c, p, p]
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    return x.reshape(n * gh * gw, c * temporal * patch * patch)


DEFAULT_MODEL = VQA_MODEL
"""The embedded tiny Video-LLM (`streamrt train vqa` builds it)."""
MANIFEST = "streamrt.json"
"""Optional file of a model directory: `{"qa": {QAConfig fields}}`, the session settings
the model was trained for (`VideoQA.from_pretrained` starts from them)."""
REBUILD_HINT = (
    "rebuild it: `streamrt train vqa --out DIR` for the embedded tiny model "
    f"({DEFAULT_MODEL}), or copy the file again from the original checkpoint"
)


class ModelFileError(StreamrtError, ValueError):
    """A file of a Video-LLM directory is truncated or unreadable."""


def resolve_model_dir(path: str | Path = DEFAULT_MODEL) -> Path:
    """`path` as given if it exists (or is absolute), else the shipped embedded model of
    that name (so the default works from any directory and after a regular install)."""
    return resolve_model(path)


def model_qa_settings(path: str | Path) -> dict[str, Any]:
    """The `qa` section of the directory's `streamrt.json` (empty without one)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return {}
    qa = _check_json(manifest).get("qa", {})
    if not isinstance(qa, dict):
        raise ModelFileError(
            f"{manifest}: 'qa' must be a mapping of QAConfig fields; " + REBUILD_HINT
        )
    return qa


def check_model_files(path: str | Path) -> None:
    """Fail with the file's name and how to rebuild it when a model directory has a
    missing or truncated `config.json`, weights file or tokenizer file."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: point at a saved Video-LLM directory, or " + REBUILD_HINT
        )
    for name in ("config.json", MANIFEST, "tokenizer.json", "tokenizer_config.json"):
        if (path / name).is_file():
            _check_json(path / name)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"{path / 'tokenizer.json'} is missing; " + REBUILD_HINT)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_check_json(index).get("weight_map", {}).values()))
    else:
        shards = [f.name for f in path.glob("*.safetensors")]
    if not shards:
        raise FileNotFoundError(f"{path / 'model.safetensors'} is missing; " + REBUILD_HINT)
    for shard in shards:
        _check_safetensors(path / shard)


def _check_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(
            f"{file} is truncated or unreadable ({exc}); " + REBUILD_HINT
        ) from None


def _check_safetensors(file: Path) -> None:
    """The header must parse and its tensors must end exactly at the end of the file."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; " + REBUILD_HINT)
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + n > size:
                raise ValueError("the header runs past the end of the file")
            header = json.loads(f.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(
            f"{file} is truncated or unreadable ({exc}); " + REBUILD_HINT
        ) from None
    if 8 + n + end != size:
        raise ModelFileError(
            f"{file} is truncated or corrupt ({size} bytes, its header lists {8 + n + end}); "
            + REBUILD_HINT
        )


ADAPTERS: dict[str, type[VLMAdapter]] = {
    t: cls
    for cls in (SmolVLMAdapter, LlavaOnevisionAdapter, Qwen2VLAdapter)
    for t in cls.model_types
}


def load_adapter(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None
) -> VLMAdapter:
    """Pick the adapter for the checkpoint at `path` from its `config.json` and load it."""
    path = Path(path)
    if not (path / "config.json").is_file():
        check_model_files(path)  # raises, naming the file
    _check_json(path / "config.json")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no streaming QA adapter for model_type {model_type!r} (supported: "
            f"{', '.join(sorted(ADAPTERS))})"
        )
    check_model_files(path)
    return ADAPTERS[model_type].from_pretrained(path, dtype=dtype, device=device)


def _image_normalisation(
    path: Path, default: tuple[tuple[float, ...], tuple[float, ...]] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from the checkpoint's preprocessor config (`default`, else SigLIP's 0.5/0.5)."""
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        f = path / name
        if f.is_file():
            cfg = json.loads(f.read_text())
            if "image_mean" in cfg and "image_std" in cfg:
                return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return default or ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
