"""The loaded generation components shared by every stream of a process."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Collection
from typing import Any

import torch

from streamrt.cache import CacheManager, KVSpec, Sequence
from streamrt.cache.process import is_process_cache, join_or_own, process_cache, unique_id
from streamrt.config import CacheConfig, GenConfig
from streamrt.devices import resolve_device
from streamrt.errors import InputError
from streamrt.gen.attention import attach_streaming
from streamrt.gen.compiled import compiled_model
from streamrt.gen.settings import apply_changes, fit_window
from streamrt.kernels import available_backends, set_attention_backend

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GenEngine:
    """Transformer (+ streaming processors), text encoder, codec and the cache manager.

    Several streams share one engine; each stream owns its sequences in the cache. Forward
    calls are serialised by a lock (the processors read one context at a time).
    """

    def __init__(
        self,
        transformer,
        text_encoder,
        codec,
        config: GenConfig,
        cache: CacheManager | None = None,
        cache_config: CacheConfig | None = None,
        given_policy_args: Collection[str] | None = None,
    ) -> None:
        """
        Args:
            transformer: A diffusers `WanTransformer3DModel`.
            text_encoder: Prompt encoder (`streamrt.models.text.TextEncoder`).
            codec: Latent <-> pixel codec (`streamrt.models.codec`).
            config: The requested settings; `self.config` holds them with the policy's
                window sized for the sampler (`streamrt.gen.settings.fit_window`).
            cache: A cache manager to share (a `Runtime`'s); None: the process's
                (`streamrt.cache.process`), or one of its own with `cache_config`.
            cache_config: Budgets of an engine's own cache manager (a preset's `cache:`
                section); its device defaults to the model's.
            given_policy_args: The policy arguments the user set (never resized); None:
                every key of `config.policy_args`.
        """
        self.requested = config
        self.given = frozenset(
            config.policy_args if given_policy_args is None else given_policy_args
        )
        self.config = fit_window(config, self.given)
        self.device = resolve_device(config.device, "gen.device")
        if config.compile != "off" and config.attention in ("xformers", "flash"):
            raise InputError(
                f"gen.compile {config.compile!r} runs attention through SDPA (or flex); "
                f"gen.attention {config.attention!r} is not traced: set gen.attention: sdpa "
                "(on CUDA its flash kernel serves rows of equal length) or gen.compile: off"
            )
        if config.attention not in available_backends(self.device):
            raise InputError(
                f"gen.attention is {config.attention!r}, which needs CUDA and its package "
                f"installed (pip install 'streamrt[gpu]'); usable here: "
                f"{', '.join(available_backends(self.device))}"
            )
        self.dtype = _DTYPES[config.dtype]
        self.transformer = transformer.to(self.device).eval()
        self.text_encoder = text_encoder
        self.codec = codec
        self.state = attach_streaming(self.transformer)
        self.model = compiled_model(self.transformer, config.compile)
        """What a forward calls: the transformer, or its compiled forward (`gen.compile`)."""
        set_attention_backend(config.attention)
        tcfg = transformer.config
        self.spec = KVSpec(
            len(transformer.blocks),
            tcfg.num_attention_heads,
            tcfg.attention_head_dim,
            1,
            self.dtype if config.kv_dtype == "auto" else config.kv_dtype,
        )
        if cache is None and cache_config is None:
            cache = process_cache(self.device)
        elif cache is None:
            cache = CacheManager(self._own_config(cache_config))
        self.cache = cache
        """The cache manager of this engine's streams (set for good at the first stream:
        the process's may be swapped for a private one then, `join_or_own`)."""
        self.consumer: str | None = None
        """This engine's consumer of `cache` (one KV layout: one resolution)."""
        self.lock = self.state.lock
        self._prompts: dict[str, torch.Tensor] = {}

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """`(channels, h, w)` of a latent frame for a `height` x `width` video."""
        p = self.transformer.config.patch_size
        step = self.codec.spatial * max(p[1], p[2])
        if height % step or width % step or height <= 0 or width <= 0:
            raise InputError(
                f"resolution {width}x{height} must be a positive multiple of {step} "
                f"(codec downsampling {self.codec.spatial} x patch size {p[1]}x{p[2]})"
            )
        rope = getattr(self.transformer.config, "rope_max_seq_len", None)
        s = self.codec.spatial
        ph, pw = height // s // p[1], width // s // p[2]
        if rope is not None and max(ph, pw) > rope:
            raise InputError(
                f"resolution {width}x{height} is {pw}x{ph} patches but this model's RoPE "
                f"table covers {rope} per side (rope_max_seq_len): use a size up to "
                f"{rope * s * p[2]}x{rope * s * p[1]} (e.g. --size 64x64 for the embedded "
                "model), or a model made "
                "for this resolution (--model DIR of a diffusers Wan pipeline, with "
                "--checkpoint FILE for causal generator weights)"
            )
        c = self.transformer.config.in_channels
        if c != self.codec.latent_channels:
            raise InputError(
                f"transformer expects {c} latent channels but the codec makes {self.codec.latent_channels}"
            )
        return c, height // self.codec.spatial, width // self.codec.spatial

    def _own_config(self, config: CacheConfig | None = None) -> CacheConfig:
        config = config or CacheConfig()
        if config.device is None:
            config = dataclasses.replace(config, device=str(self.device))
        return config

    def _ensure_consumer(self, tokens_per_frame: int) -> None:
        spec = dataclasses.replace(self.spec, tokens_per_block=tokens_per_frame)
        if self.consumer is None:
            self.cache, self.consumer = join_or_own(
                self.cache,
                "gen",
                spec,
                lambda: CacheManager(self._own_config()),
                f"a generator with {spec.block_bytes}-byte KV blocks",
                priority=10,
                offload=False,
            )
            if is_process_cache(self.cache):  # the consumer goes when the engine does
                weakref.finalize(self, self.cache.release_later, [], self.consumer)
            return
        existing = self.cache.consumers[self.consumer]
        if existing.spec != spec:
            raise InputError(
                "every stream of one engine must use the same resolution (tokens per frame "
                f"{existing.spec.tokens_per_block}, got {tokens_per_frame})"
            )

    def sequences(self) -> list[Sequence]:
        """The open KV sequences of this engine's streams (the manager may hold others')."""
        return self.cache.sequences_of(self.consumer) if self.consumer else []

    def register_consumer(self, config: GenConfig) -> None:
        """Register the engine's cache consumer for `config`'s resolution (if not yet)."""
        _c, h, w = self.latent_shape(config.height, config.width)
        p = self.transformer.config.patch_size
        self._ensure_consumer((h // p[1]) * (w // p[2]))

    def open_sequence(self, name: str, config: GenConfig) -> Sequence:
        self.register_consumer(config)
        return self.cache.open_sequence(
            self.consumer, config.policy, seq_id=name, **config.policy_args
        )

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt embeddings `[1, text_len, dim]` (memoised per prompt text)."""
        if prompt not in self._prompts:
            emb = self.text_encoder.encode([prompt]).to(self.device, self.dtype)
            if len(self._prompts) > 64:
                self._prompts.pop(next(iter(self._prompts)))
            self._prompts[prompt] = emb
        return self._prompts[prompt]

    def text_key(self, prompt: str) -> tuple:
        """Identity of `prompt`'s embeddings under this engine's text encoder: rows with
        the same key share cross-attention K/V."""
        return (id(self.text_encoder), prompt)

    def open_stream(self, prompt: str, config: GenConfig | None = None, **overrides: Any):
        """A new stream of `prompt`: the engine's settings (or `config`) with `overrides`,
        its window sized for its sampler (`streamrt.gen.settings`)."""
        from streamrt.gen.stream import GenStream

        if config is None or config is self.config:
            base, given = self.requested, self.given
        else:
            base, given = config, frozenset(config.policy_args)
        cfg = fit_window(*apply_changes(base, given, overrides))
        for name in ("kv_dtype", "compile"):
            mine, theirs = getattr(self.config, name), getattr(cfg, name)
            if theirs != mine:
                raise InputError(
                    f"gen.{name} is the engine's ({mine}); a stream cannot set it to "
                    f"{theirs}: set it in the engine's config"
                )
        with self.lock:
            return GenStream(self, unique_id("g"), prompt, cfg)
