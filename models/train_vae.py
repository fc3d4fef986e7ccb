"""Training of a tiny `AutoencoderKLWan` on the procedural world: the latent space of the
embedded generator (issue #15).

The stock diffusers class real Wan uses, at 8x spatial and no temporal compression
(`temperal_downsample=[False] * 3`, so one latent frame per frame and a stream's chunk
of 3 frames is 3 latent frames), `z_dim` channels per latent pixel: a 64x64 frame is an
8x8 latent, 64 tokens at patch 1 (the pixel codec's count), and the decoder, a
convolutional net trained on the world's frames, draws the edges that a transformer
regressing 48 pixel values per token drew as blobs (`assets/tiny-world/TRAINING.md`).

    frames [B, 3, T, 64, 64] -> encoder -> (mu, logvar) [B, z, T, 8, 8] -> z ~ N(mu, var)
                             -> decoder -> [B, 3, T, 64, 64]
    loss = object-weighted (L1 + MSE) of the reconstruction + kl_weight x KL(N(mu, var) || N(0, 1))

By default the VAE is frame-wise (`frame_wise`: the causal convs' taps on earlier
frames are held at zero), so it trains on single frames and a stream of any length
decodes as it was trained; the fast decode path then runs its convs in 2-D
(`models/wan_vae_fast.py`). Whole clips go through the encoder and decoder in one call
each: with no temporal down- or upsampling, a causal conv over T frames with zero history
is what the streaming codec computes chunk by chunk with its cache
(`tests/unit/test_train_vae.py`). The export is the weight average, with `latents_mean` /
`latents_std` measured on world clips so the transformer sees unit-variance latents (Wan's
pipeline normalises the same way).

    cfg = TrainVAEConfig(max_minutes=55)
    train(cfg, work_dir="build/train-vae", output="build/tiny-vae")
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from streamrt.errors import InputError
from streamrt.models.train_gen_data import object_pixels
from streamrt.models.train_schedule import (
    RunSchedule,
    lr_at,
    read_checkpoint,
    resume_or_new,
    run_steps,
    torch_threads,
    update_average,
    write_checkpoint,
)
from streamrt.world import WorldConfig, make_clip


@dataclass
class TrainVAEConfig(RunSchedule):
    """One training run of the tiny Wan VAE (defaults: the recipe of `build/tiny-vae`)."""

    steps: int = 20_000
    lr: float = 1e-3
    batch_size: int = 16
    """Clips per step."""

    num_frames: int = 1
    """Frames per clip (1 is enough for a `frame_wise` VAE)."""

    frame_wise: bool = True
    """Keep every causal conv's taps on earlier frames at zero: each frame is encoded and
    decoded on its own, so a stream of any length sees what training saw. A VAE whose
    past taps train on short clips meets a history at stream time that it never saw and
    diverges (measured, 3-frame clips at step 450: squared error 460 at frame 0, 3866 at
    frame 5, 39036 at frame 8); the transformer carries the time."""

    base_dim: int = 8
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channels per stage (`base_dim` x each); len - 1 = 3 downsamplings: 8x spatial."""

    z_dim: int = 8
    """Latent channels (the transformer's in/out channels at patch 1)."""

    kl_weight: float = 1e-4
    """Weight of the KL term (per latent value, against the per-pixel reconstruction):
    small, so the latent keeps the shapes, but enough to keep it smooth for diffusion."""

    object_weight: float = 4.0
    """Extra weight of pixels on or within `edge_px` of an object (shapes are 2-4 % of a
    frame: an unweighted loss is met by the background and blurred edges)."""

    edge_px: int = 2

    world_fps: tuple[float, ...] = (4.0, 8.0)
    """Frame rates the clips are drawn at (the generator trains at 4, streams play at 8)."""

    max_objects: int = 3

    stats_clips: int = 64
    """World clips whose latents give the exported per-channel mean and std."""

    model: dict = field(default_factory=dict)
    """Other `AutoencoderKLWan` overrides."""

    init_from: str | None = None
    """An exported VAE directory (this recipe's shape) whose weights the run starts from
    (a new optimizer; the other fields must describe the same network)."""

    decoder_only: bool = False
    """Train only the decoder (and `post_quant_conv`): the encoder, so the latent space
    and its statistics, stay `init_from`'s, and a generator trained on its latents keeps
    working with the new decoder (`train_gen.vae_digest` covers the encoder only)."""

    latent_noise: float = 0.0
    """Largest extra Gaussian noise on the latents the decoder sees, in units of their
    per-channel std (per clip uniform in [0, this]): the decoder learns to draw the clean
    frame from a latent a little off the encoder's, as a generator's output is, instead of
    the colour gradients and specks the plain decoder draws from it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent_noise < 0:
            raise InputError(f"latent_noise must be >= 0, got {self.latent_noise}")
        if self.decoder_only and not self.init_from:
            raise InputError(
                "decoder_only trains a new decoder for an existing encoder: pass init_from "
                "(the VAE directory whose latent space to keep)"
            )


def build_vae(cfg: TrainVAEConfig) -> AutoencoderKLWan:
    z = cfg.z_dim
    vae = AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=z,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False] * (len(cfg.dim_mult) - 1),
        latents_mean=[0.0] * z,
        latents_std=[1.0] * z,
        **cfg.model,
    )
    if cfg.init_from:
        load_weights(vae, cfg.init_from)
    if cfg.frame_wise:
        freeze_past_taps(vae)
    if cfg.decoder_only:
        for name, p in vae.named_parameters():
            p.requires_grad_(not name.startswith(ENCODER_SIDE))
    return vae


ENCODER_SIDE = ("encoder.", "quant_conv.")
"""The weights that define the latent space (what `decoder_only` keeps)."""


def load_weights(vae: AutoencoderKLWan, path: str | Path) -> None:
    """Copy the weights and latent statistics of the exported VAE directory `path` into
    `vae` (an `InputError` naming what to fix if it is missing or another network)."""
    from streamrt.models.wan_checkpoints import load_wan_vae

    if not (Path(path) / "config.json").is_file():
        raise InputError(f"{path} is not a VAE directory (no config.json): pass a VAE export")
    other = load_wan_vae(path)  # a missing or corrupt weight file: its CheckpointError
    try:
        vae.load_state_dict(other.state_dict())
    except RuntimeError as exc:
        why = " ".join(str(exc).split())[:200]  # one line
        raise InputError(
            f"{path}: cannot start from this VAE ({type(exc).__name__}: {why}); "
            "pass an export of this recipe's network (same base_dim, dim_mult, z_dim)"
        ) from None
    vae.register_to_config(
        latents_mean=list(other.config.latents_mean), latents_std=list(other.config.latents_std)
    )


def freeze_past_taps(vae: AutoencoderKLWan) -> None:
    """Zero the taps of every temporal conv on earlier frames and keep them zero (their
    gradient is masked, so AdamW's update and decay leave them at exactly 0)."""
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d) and module.kernel_size[0] > 1:
            mask = torch.zeros_like(module.weight)
            mask[:, :, -1] = 1.0  # causal padding: the last tap is the current frame
            with torch.no_grad():
                module.weight.mul_(mask)
            module.weight.register_hook(lambda grad, m=mask: grad * m)


# ---------------------------------------------------------------------- data


def sample_clips(
    cfg: TrainVAEConfig, step: int, batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames `[B, 3, T, 64, 64]` in [-1, 1] and per-pixel loss weights `[B, 1, T, 64, 64]`
    of step `step` (seeded by (seed, step): a resumed run sees the same data)."""
    rng = np.random.default_rng((cfg.seed, step, 7))
    frames, weights = [], []
    for _ in range(batch or cfg.batch_size):
        world = WorldConfig(
            fps=float(rng.choice(cfg.world_fps)), max_objects=cfg.max_objects, qa_per_kind=0
        )
        clip = make_clip(int(rng.integers(0, 2**31)), cfg.num_frames, world)
        frames.append(torch.from_numpy(clip.frames))
        weights.append(torch.from_numpy(object_pixels(clip.frames)))
    x = torch.stack(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    near = torch.stack(weights).float().unsqueeze(1)
    k = 2 * cfg.edge_px + 1
    near = torch.nn.functional.max_pool3d(
        near, (1, k, k), stride=1, padding=(0, cfg.edge_px, cfg.edge_px)
    )
    return x, 1.0 + cfg.object_weight * near


# ---------------------------------------------------------------------- model passes


def encode_moments(vae: AutoencoderKLWan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) `[B, z, T, h, w]` of whole clips, one encoder call."""
    moments = vae.quant_conv(vae.encoder(x))
    mu, logvar = moments.chunk(2, dim=1)
    return mu, logvar.clamp(-30.0, 20.0)


def decode_latents(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """Frames of un-normalised latents `z`, one decoder call (first_chunk: the clip starts
    a stream, as the streaming codec's first call does)."""
    return vae.decoder(vae.post_quant_conv(z), first_chunk=True)


def vae_loss(
    vae: AutoencoderKLWan, x: torch.Tensor, weight: torch.Tensor, cfg: TrainVAEConfig, gen
) -> torch.Tensor:
    """Weighted L1 + MSE of a sampled reconstruction, plus `kl_weight` x the KL term (not
    with `decoder_only`: the encoder is fixed); `latent_noise` perturbs what the decoder
    sees."""
    with torch.set_grad_enabled(not cfg.decoder_only):
        mu, logvar = encode_moments(vae, x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
    if cfg.latent_noise > 0:
        scale = mu.detach().transpose(0, 1).flatten(1).std(dim=1)[None, :, None, None, None]
        level = cfg.latent_noise * torch.rand(mu.shape[0], 1, 1, 1, 1, generator=gen)
        z = z + level * scale * torch.randn(mu.shape, generator=gen)
    out = decode_latents(vae, z)
    err = out - x
    recon = (weight * (err.abs() + err.pow(2))).mean()
    if cfg.decoder_only:
        return recon
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return recon + cfg.kl_weight * kl


# ---------------------------------------------------------------------- state


@dataclass
class VAEState:
    cfg: TrainVAEConfig
    vae: AutoencoderKLWan
    ema: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def new_state(cfg: TrainVAEConfig) -> VAEState:
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        vae = build_vae(cfg)
    opt = torch.optim.AdamW(
        [p for p in vae.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=(0.9, 0.99),
        weight_decay=cfg.weight_decay,
    )
    ema = {n: p.detach().clone() for n, p in vae.named_parameters()}
    return VAEState(cfg, vae, ema, opt)


def save_checkpoint(state: VAEState, path: Path) -> None:
    blob = {
        "config": dataclasses.asdict(state.cfg),
        "step": state.step,
        "losses": state.losses,
        "seconds": state.seconds,
        "vae": state.vae.state_dict(),
        "ema": state.ema,
        "optimizer": state.optimizer.state_dict(),
    }
    write_checkpoint(blob, path)


def load_checkpoint(path: Path, cfg: TrainVAEConfig | None = None) -> VAEState:
    blob = read_checkpoint(path)
    saved = blob["config"]
    saved["dim_mult"] = tuple(saved["dim_mult"])
    saved["world_fps"] = tuple(saved["world_fps"])
    cfg = cfg or TrainVAEConfig(**saved)
    state = new_state(cfg)
    state.vae.load_state_dict(blob["vae"])
    state.optimizer.load_state_dict(blob["optimizer"])
    state.ema = blob["ema"]
    state.step, state.losses, state.seconds = blob["step"], blob["losses"], blob["seconds"]
    return state


def train_step(state: VAEState) -> float:
    cfg = state.cfg
    x, weight = sample_clips(cfg, state.step)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step)
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(cfg, state.step, state.seconds)
    loss = vae_loss(state.vae, x, weight, cfg, gen)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.vae.parameters(), cfg.grad_clip)
    state.optimizer.step()
    state.step += 1
    update_average(state.ema, state.vae.named_parameters(), cfg, state.step)
    state.losses.append(loss.item())
    return state.losses[-1]


def averaged_vae(state: VAEState) -> AutoencoderKLWan:
    vae = copy.deepcopy(state.vae).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            p.copy_(state.ema[name])
    return vae


@torch.no_grad()
def latent_stats(vae: AutoencoderKLWan, cfg: TrainVAEConfig) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of `cfg.stats_clips` held-out clips."""
    x, _ = sample_clips(dataclasses.replace(cfg, seed=cfg.seed + 99_991), 0, cfg.stats_clips)
    mu, _ = encode_moments(vae, x)
    flat = mu.transpose(0, 1).flatten(1)
    return flat.mean(dim=1).tolist(), flat.std(dim=1).clamp_min(1e-3).tolist()


def export_vae(state: VAEState, output: str | Path) -> AutoencoderKLWan:
    """Write the averaged weights as a diffusers `AutoencoderKLWan` directory whose config
    carries the latents' statistics."""
    vae = averaged_vae(state)
    if not state.cfg.decoder_only:  # else the encoder's, so its statistics, are unchanged
        mean, std = latent_stats(vae, state.cfg)
        vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(str(output))
    return vae


@torch.no_grad()
def reconstruction_report(vae: AutoencoderKLWan, clips: int = 32, seed: int = 12345) -> dict:
    """Held-out reconstructions through the streaming codec (chunks of 3 frames): PSNR, and
    how often `classify_shapes` names each shape the same on the original and the
    reconstruction (one object per clip, every shape)."""
    from streamrt.metrics import classify_shapes
    from streamrt.models.codec import WanVAECodec, frames_to_tensor, tensor_to_frames
    from streamrt.world import SHAPES

    codec = WanVAECodec(vae)
    rng = np.random.default_rng(seed)
    same = {s: [0, 0] for s in SHAPES}
    mse = []
    world = WorldConfig(fps=4.0, max_objects=1, qa_per_kind=0, late_entry_prob=0.0)
    for i in range(clips):
        shape = SHAPES[i % len(SHAPES)]
        clip = make_clip(int(rng.integers(0, 2**31)), 9, world)
        caption = clip.caption.replace(clip.scene.objects[0].shape, shape)
        clip = make_clip(int(rng.integers(0, 2**31)), 9, world, caption=caption)
        enc, dec = codec.encoder(), codec.decoder()
        x = frames_to_tensor(clip.frames)
        out = torch.cat([dec.decode(enc.encode(x[:, :, j : j + 3])) for j in range(0, 9, 3)], 2)
        rec = tensor_to_frames(out)
        mse.append(((rec.astype(np.float64) - clip.frames) ** 2).mean())
        color = clip.scene.objects[0].color
        truth = classify_shapes(clip.frames, color)
        got = classify_shapes(rec, color)
        for a, b in zip(truth, got, strict=True):
            if a is not None:
                same[shape][1] += 1
                same[shape][0] += int(a == b)
    psnr = float(10 * np.log10(255.0**2 / max(1e-9, float(np.mean(mse)))))
    return {"psnr": psnr, "shape_kept": {s: f"{a} of {n}" for s, (a, n) in same.items()}}


# ---------------------------------------------------------------------- loop


def train(
    cfg: TrainVAEConfig,
    work_dir: str | Path | None,
    output: str | Path | None = None,
    resume: bool = True,
    log: Callable[[str], None] = print,
) -> VAEState:
    """Train until `cfg.steps` or `cfg.max_minutes` run out; every checkpoint exports."""
    with torch_threads(cfg.threads):
        state, ckpt = resume_or_new(cfg, work_dir, resume, load_checkpoint, new_state, log)
        state.vae.train()

        def at_checkpoint(st: VAEState) -> None:
            if ckpt is not None:
                save_checkpoint(st, ckpt)
            if output is not None:
                export_vae(st, output)

        run_steps(state, train_step, at_checkpoint, log)
        state.vae.eval()
        return state
