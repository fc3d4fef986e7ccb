"""Video-LLM adapters: the stock transformers classes, seen through one small interface.

The QA runtime needs five things from a Video-LLM, whatever its family:

    frames  --encode_frames-->  visual token embeddings   [N, tokens_per_frame, hidden]
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
        self.tokens_per_frame = int(self.encode_frames(self._blank()).shape[1])

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

    @torch.no_grad()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """Visual token embeddings of each frame, `[N, tokens_per_frame, hidden]`."""
        return self._vision_features(pixels)

    @torch.no_grad()
    def embed_text(self, ids: list[int]) -> torch.Tensor:
        """Input embeddings of token ids, `[n, hidden]`."""
        t = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self.language_model.get_input_embeddings()(t)

    def text_positions(self, n: int) -> torch.Tensor:
        """Position offsets `[n, rope_axes]` of `n` text tokens laid from 0."""
        return torch.arange(n).unsqueeze(1).expand(n, self.rope_axes)

    def frame_positions(self) -> torch.Tensor:
        """Position offsets `[tokens_per_frame, rope_axes]` of one frame's tokens laid from 0."""
        return self.text_positions(self.tokens_per_frame)

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
    live stream has no end, so a frame's block holds only its pooled tokens.
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
    rope_axes = 3
    FRAME_GRID = 8
    """Merged tokens per side of a frame (64 tokens per frame)."""

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None
    ) -> VLMAdapter:
        from transformers import AutoModelForImageTextToText

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

    def frame_positions(self) -> torch.Tensor:
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
        raise FileNotFoundError(f"{path} has no config.json: point at a saved Video-LLM directory")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no streaming QA adapter for model_type {model_type!r} (supported: "
            f"{', '.join(sorted(ADAPTERS))})"
        )
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
