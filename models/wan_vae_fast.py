"""Faster `AutoencoderKLWan` on CPU, attached as diffusers hooks; outputs equal diffusers'.

The decode of a tiny Wan VAE spends ~80% of its time in two places (torch profiler, one
thread, 64x64):

    WanRMS_norm        ~45%  `F.normalize` over the channel dim runs `linalg_vector_norm`'s
                             generic strided reduction (~0.3 ms a call at 3 x 64 x 64)
    WanCausalConv3d    ~35%  batch-1 float32 `conv3d` takes PyTorch's `slow_conv3d`
                             (vol2col + one GEMM): ATen sends a batch-1 input to oneDNN only
                             when N*C*T*H > 20480, a rule tuned for 2-D that ignores W

`apply_fast_wan_vae(vae)` registers a hook (`diffusers.hooks.ModelHook.new_forward`, the
extension point diffusers' own caches use) on every such module:

    norm   x * rsqrt(max(sum_c x^2, eps^2)) * (scale * gamma) + bias
           == F.normalize(x, dim=c, eps) * scale * gamma + bias
    conv   the causal time padding (cache frames, then zeros) as before, the spatial zero
           padding folded into the convolution, and oneDNN (`torch.mkldnn_convolution`)
           for float32 CPU inputs large enough to gain from it (`MKLDNN_MIN_NUMEL`);
           a conv whose taps on earlier frames are all zero (a frame-wise VAE,
           `streamrt train vae`) runs as one 2-D conv over the frames: a third of the work

Other dtypes and devices keep diffusers' forward. Results equal the stock modules within
float32 rounding (~1e-6; tests/unit/test_wan_vae_fast.py). `remove_fast_wan_vae` undoes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

NORM_HOOK = "streamrt_fast_rms_norm"
CONV_HOOK = "streamrt_fast_causal_conv"

MKLDNN_MIN_NUMEL = 16384
"""oneDNN's fixed cost (~40 us a call) beats slow_conv3d from about this many input values
(measured on this CPU, one thread: 3 x 3 x 18 x 18 is 3x slower, 3 x 3 x 66 x 66 2x faster)."""

_EPS_SQ = 1e-24  # F.normalize's eps (1e-12), squared: it clamps the norm, we clamp its square


class FastRMSNormHook(ModelHook):
    """`WanRMS_norm` as one squared sum and one rsqrt instead of `F.normalize`."""

    def new_forward(self, module: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
        dim = 1 if module.channel_first else -1
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        inv = torch.rsqrt((xf * xf).sum(dim, keepdim=True).clamp_min(_EPS_SQ))
        if x.dtype is not xf.dtype:  # diffusers normalises in float32, then casts back
            return (xf * inv).to(x.dtype) * module.scale * module.gamma + module.bias
        return x * inv * (module.gamma * module.scale) + module.bias


class FastCausalConvHook(ModelHook):
    """`WanCausalConv3d` with spatial padding inside the conv and oneDNN for large inputs."""

    def new_forward(
        self, module: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype is not torch.float32:
            return self.fn_ref.original_forward(x, cache_x)
        # module._padding: (w, w, h, h, t_front, 0), as F.pad takes it
        pw, _, ph, _, pt, _ = module._padding
        if pt > 0 and self._frame_wise(module):
            b, c, t, h, w_ = x.shape
            frames = x.transpose(1, 2).reshape(b * t, c, h, w_)
            w2 = module.weight[:, :, -1]
            out = F.conv2d(
                frames,
                w2,
                module.bias,
                module.stride[1:],
                [ph, pw],
                module.dilation[1:],
                module.groups,
            )
            return out.reshape(b, t, *out.shape[1:]).transpose(1, 2)
        if cache_x is not None and pt > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            pt -= cache_x.shape[2]
        if pt > 0:
            x = F.pad(x, (0, 0, 0, 0, pt, 0))
        w, b, pad, stride, dil = (
            module.weight,
            module.bias,
            [0, ph, pw],
            module.stride,
            module.dilation,
        )
        if x.numel() >= MKLDNN_MIN_NUMEL and torch.backends.mkldnn.is_available():
            return torch.mkldnn_convolution(x, w, b, pad, list(stride), list(dil), module.groups)
        return F.conv3d(x, w, b, stride, pad, dil, module.groups)

    def _frame_wise(self, module: WanCausalConv3d) -> bool:
        """True when every tap on an earlier frame is zero (checked again after any
        change of the weights)."""
        version = module.weight._version
        if getattr(self, "_checked", None) != (id(module.weight), version):
            self._checked = (id(module.weight), version)
            self._zero_past = not bool(module.weight[:, :, :-1].any())
        return self._zero_past


def apply_fast_wan_vae(vae: torch.nn.Module) -> torch.nn.Module:
    """Hook every `WanRMS_norm` and `WanCausalConv3d` of `vae` (encoder and decoder);
    applying twice is a no-op. Returns `vae`."""
    for module in vae.modules():
        hook, name = _hook_for(module)
        if hook is not None:
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if registry.get_hook(name) is None:
                registry.register_hook(hook, name)
    return vae


def remove_fast_wan_vae(vae: torch.nn.Module) -> torch.nn.Module:
    """Give every module of `vae` back diffusers' own forward. Returns `vae`."""
    for module in vae.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            for name in (NORM_HOOK, CONV_HOOK):
                registry.remove_hook(name, recurse=False)
    return vae


def _hook_for(module: torch.nn.Module) -> tuple[ModelHook | None, str]:
    if isinstance(module, WanRMS_norm):
        return FastRMSNormHook(), NORM_HOOK
    if isinstance(module, WanCausalConv3d):
        return FastCausalConvHook(), CONV_HOOK
    return None, ""
