"""Training of the embedded tiny text-to-video model on the procedural world.

Diffusion forcing under the engine's block-causal attention: a clip of F frames is cut
into chunks of C frames (the streams' `chunk_frames`); every chunk gets its own noise
level, some chunks are left clean (sigma 0, like the K/V the engine's clean refresh
writes), and chunk i attends to chunks <= i only, exactly what the cache gives a stream.

    frames       | f0 f1 f2 | f3 f4 f5 | f6 f7 f8 |
    sigma        |   0.0    |   0.71   |   0.32   |      one per chunk, 0 = clean context
    sees         |  c0      |  c0 c1   | c0 c1 c2 |      block-causal mask
    loss         |   --     |   MSE(v_pred, eps - x0) on noisy chunks only

x_t = (1 - sigma) * x0 + sigma * eps and the model predicts v = eps - x0 (schedule.py).

What makes the objects learnable on two CPU cores (assets/tiny-world/TRAINING.md has
the measurements): (1) the transformer denoises a 2x-downsampled pixel latent
(`PixelCodec(spatial=2)`, 48 values per 4x4 patch instead of 192 per 8x8), (2) the loss
weighs object pixels `object_weight` times more (a shape covers 1.5-4 % of a frame, so
an unweighted MSE is met by drawing the background alone), (3) every chunk, the first
included, is learnt from noise on random scenes, and streams sample with the
deterministic step (`renoise: predicted`): Wan has no absolute position embedding, so
where an object appears must come from the initial noise, which a fresh-noise
re-noise (Self-Forcing's loop, for distilled models) throws away at every step.
The transformer stays the stock diffusers class: the mask enters through a subclass of
diffusers' own attention processor, so the trained model streams chunk by chunk in
`GenEngine` with the same attention it was trained under.

    cfg = TrainGenConfig(steps=3000)
    train(cfg, work_dir="build/train-gen", output="assets/tiny-world")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from streamrt.errors import InputError
from streamrt.models.generator_files import tiny_random_parts
from streamrt.models.train_gen_data import (
    sample_batch,
    sample_noise,
    sample_sigmas,
    world_config,
)
from streamrt.models.train_gen_export import export_generator, inherited_settings, plot_losses
from streamrt.models.train_gen_masks import loss_weight
from streamrt.models.train_schedule import (
    RunSchedule,
    lr_at,
    progress,
    read_checkpoint,
    resume_or_new,
    run_steps,
    torch_threads,
    update_average,
    write_checkpoint,
)
from streamrt.models.wan import apply_block_causal, block_causal_mask
from streamrt.world import (
    VOCAB,
)


@dataclass
class TrainGenConfig(RunSchedule):
    """One training run of the tiny text-to-video model (defaults: the shipped model's
    recipe; the schedule fields are `RunSchedule`'s)."""

    threads: int = 2  # this model's matmuls are large enough for two on a quiet machine
    batch_size: int = 8
    """Clips per step."""

    num_frames: int = 9
    """Frames per training clip (a multiple of `chunk_frames`); the longest context the
    model learns to use, so streams keep at most this many frames (`window_blocks`)."""

    chunk_frames: int = 3
    """Frames per chunk: the unit of noise levels and of the causal mask."""

    clean_prob: float = 0.3
    """Chance that a chunk is clean context (sigma 0, no loss)."""

    sigma_shift: float = 3.0
    """Noise levels are `shift*u / (1 + (shift-1)*u)`, u uniform: more weight on high noise."""

    object_weight: float = 8.0
    """Extra loss weight of object pixels at the start of the run: a latent pixel's weight
    is 1 + this x the share of its pixels that show an object (palette colours;
    backgrounds are grey). It makes the small shapes worth learning early on."""

    object_weight_final: float = 0.5
    """Extra object weight at the end of the run, reached linearly. A weighted MSE is met
    by predicting object colour wherever an object may be, so a large weight draws shapes
    too big (measured: 15-25 % of the frame instead of 1.5-4 % at weight 8)."""

    edge_weight: float = 0.0
    """Extra loss weight of the background ring `edge_px` pixels around each object (its
    silhouette's outside, where a circle, a square and a triangle of one size differ).
    The object weight alone makes smearing an object over its surroundings cheap, so
    every shape is learnt as the same blob (`classify_shapes`: 0 of 301 square and
    triangle frames of the shipped model before this weight)."""

    edge_px: int = 3
    """Width of that ring in pixels."""

    shape_weight: float = 0.0
    """Extra loss weight of the pixels where an object's shape differs from the other
    shapes of its size at its place (`train_gen_masks.shape_difference`): the pixels that
    tell a circle, a square and a triangle apart."""

    progressive_prob: float = 0.0
    """Chance that a noisy chunk gets frame-wise rising noise levels instead of one level:
    sigma_j = clip(a + j * lag, 0, 1) for its frames j, lag ~ U(0, `progressive_lag`),
    a ~ U(-(C-1) lag, 1), so its last frame is always noisy (diffusion forcing inside a
    chunk). The shipped model saw it for 1074 steps (assets/tiny-world/TRAINING.md); it
    did not make shapes follow the prompt's direction, drifting noise did."""

    progressive_lag: float = 0.5
    """Largest noise step between consecutive frames of a progressive chunk."""

    drift_prob: float = 0.0
    """Chance that a clip's noise is a drifting field (`streamrt.gen.noise`) along its
    caption's first direction word, `noise_drift` latent pixels per frame, as streams with
    `GenConfig.noise_drift` draw it: the model learns that noise moving one way is an
    object moving that way (Go-with-the-Flow's noise warping, with the prompt's direction
    in place of optical flow)."""

    noise_drift: float = 1.0
    """Latent pixels per frame of the drifting noise (the shipped manifest's value)."""

    codec_spatial: int = 2
    """Spatial factor of the pixel codec (`PixelCodec(spatial)`); patch side 8 / this."""

    vae: str | None = None
    """A trained `AutoencoderKLWan` directory (`streamrt train vae`): the transformer then
    denoises its latents at patch 1 instead of pixels, and the VAE (frozen) is exported
    with the generator (codec "wan_vae"); `codec_spatial` is not used."""

    vae_patch: int = 1
    """Patch side over the VAE's latents: 1 for an 8x VAE (64 tokens per 64x64 frame), 2
    for a 4x VAE (the same 64 tokens, as real Wan's 8x VAE with patch 2 over 16x)."""

    caption_dropout: float = 0.1
    """Chance that a clip's caption is replaced by "" (enables classifier-free guidance)."""

    max_objects: int = 2
    """Most objects per training scene (at least one)."""

    object_size: tuple[int, int] = (4, 7)
    """Half-extent range of the training world's objects (`WorldConfig.object_size`)."""

    world_fps: float = 4.0
    """Frame rate of the training world: objects move (speed / fps) pixels per frame, so 4
    doubles the default world's steps to 1-5 pixels (0.5-2.5 latent pixels at s = 2).
    At 8, the steps of slow objects are a quarter of a 4x4 latent patch and the model
    learnt shapes that stand still (measured at step 2000)."""

    text_len: int = 16
    """Prompt tokens (captions of two objects fit)."""

    model: dict[str, Any] = field(
        default_factory=lambda: {
            "num_layers": 4,
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "ffn_dim": 256,
        }
    )
    """`WanTransformer3DModel` overrides of `tiny_random_parts` (patch 1 x 8/s x 8/s).
    The width (heads x head_dim) must be >= the values in one patch (48 at s = 2, 192 at
    s = 1): a narrower model cannot see or remove part of each patch's noise, and it
    stays in every frame (measured at s = 1, width 128)."""

    compile: bool = True
    """`torch.compile` the training forward (about 1.3x faster on CPU after ~10 s)."""

    init_from: str | None = None
    """Generator directory whose weights start a fresh run (`train_gen_resample.init_state`:
    new optimizer, step 0); its architecture must be this config's. Not read on resume."""

    resample_prob: float = 0.0
    """Chance that a clip's first 1..n-1 chunks are context the model regenerates itself
    (`train_gen_resample`: training on its own errors, as streams see them); 0: off."""

    resample_sigma: tuple[float, float] = (0.3, 0.9)
    """Range of the noise level a context chunk is put back to before regeneration."""

    resample_timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    """Sampler schedule of the regeneration (the shipped manifest's), with `resample_shift`:
    a chunk noised to sigma_r takes the deterministic steps of the levels below it."""

    resample_shift: float = 1.0

    distill_from: str | None = None
    """A generator directory of this run's architecture whose `distill_substeps`-step
    sampler the run's few-step sampler (`resample_timesteps`) learns to match
    (`train_gen_distill`); None: plain flow matching."""

    distill_substeps: int = 4
    """Teacher steps per student step (4: a 16-step teacher for the 4-step sampler)."""

    distill_guidance: float = 1.0
    """Classifier-free guidance of the teacher, absorbed by the student (1: none)."""

    adversarial_weight: float = 0.0
    """Norm of the caption-conditioned critic's gradient on the predicted velocity as a
    multiple of the regression's (`train_gen_adversarial`): rewards sharp frames of the
    prompted shape over the mean's blob; 0: off."""

    adversarial_max_sigma: float = 1.0
    """The critic judges the one-step clean estimate of chunks noised up to this level."""

    adversarial_lr: float = 2e-4
    """Learning rate of the critic (Adam, betas 0 and 0.99)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_frames % self.chunk_frames:
            raise InputError(
                f"num_frames ({self.num_frames}) must be a multiple of chunk_frames "
                f"({self.chunk_frames})"
            )
        if not 0.0 <= self.clean_prob < 1.0:
            raise InputError(f"clean_prob must lie in [0, 1), got {self.clean_prob}")
        if not 0.0 <= self.progressive_prob <= 1.0:
            raise InputError(f"progressive_prob must lie in [0, 1], got {self.progressive_prob}")
        if not 0.0 <= self.drift_prob <= 1.0:
            raise InputError(f"drift_prob must lie in [0, 1], got {self.drift_prob}")
        if not 0.0 <= self.resample_prob <= 1.0:
            raise InputError(f"resample_prob must lie in [0, 1], got {self.resample_prob}")
        if self.distill_substeps < 1:
            raise InputError(f"distill_substeps must be >= 1, got {self.distill_substeps}")
        if self.distill_from and self.resample_prob > 0:
            raise InputError(
                "distillation trains on clean context: resample_prob must be 0 with distill_from"
            )
        if self.adversarial_weight < 0 or not 0.0 < self.adversarial_max_sigma <= 1.0:
            raise InputError(
                "adversarial_weight must be >= 0 and adversarial_max_sigma in (0, 1], got "
                f"{self.adversarial_weight} and {self.adversarial_max_sigma}"
            )
        if self.distill_from and self.adversarial_weight > 0:
            raise InputError("adversarial_weight applies to flow matching, not to distill_from")
        if self.vae_patch < 1:
            raise InputError(f"vae_patch must be >= 1, got {self.vae_patch}")
        self.resample_sigma = tuple(float(x) for x in self.resample_sigma)
        self.resample_timesteps = tuple(int(x) for x in self.resample_timesteps)
        lo, hi = self.resample_sigma if len(self.resample_sigma) == 2 else (-1.0, -1.0)
        if not 0.0 < lo <= hi <= 1.0:
            raise InputError(
                f"resample_sigma must be two levels 0 < lo <= hi <= 1, got {self.resample_sigma}"
            )


# ---------------------------------------------------------------------- loss


def flow_matching_loss(
    transformer,
    text_encoder,
    codec,
    frames: torch.Tensor,
    objects: torch.Tensor,
    captions: list[str],
    cfg: TrainGenConfig,
    gen: torch.Generator,
    object_weight: float | None = None,
    sampler=None,
    teacher=None,
    adversary=None,
) -> torch.Tensor:
    """Object-weighted mean squared velocity error over the noisy frames of a batch, in
    the codec's latent space (mask already applied); `object_weight` defaults to the
    config's starting weight. With `cfg.resample_prob`, some clips' context is the
    model's own regeneration by `sampler` (default `transformer`; `train_gen_resample`).
    With a `teacher`, the loss is `train_gen_distill.distill_loss` instead; with an
    `adversary` (`train_gen_adversarial.Adversary`), its critic's term is added."""
    if object_weight is None:
        object_weight = cfg.object_weight
    x0 = codec.encode(frames)
    weight = loss_weight(codec, objects, cfg, object_weight)
    _, _, _, h, w = x0.shape
    p = transformer.config.patch_size
    tokens_per_frame = (h // p[1]) * (w // p[2])
    sigma = sample_sigmas(cfg, x0.shape[0], gen)
    eps = sample_noise(cfg, x0.shape, captions, gen)
    if teacher is not None:
        from streamrt.models.train_gen_distill import distill_loss

        return distill_loss(
            transformer, teacher, text_encoder, x0, eps, weight, captions, cfg, gen,
            tokens_per_frame,
        )  # fmt: skip
    embeds = text_encoder.embed(captions)
    context = x0
    if cfg.resample_prob > 0:
        from streamrt.models.train_gen_resample import resampled_inputs

        context, sigma = resampled_inputs(
            sampler or transformer, embeds, x0, eps, sigma, cfg, gen, tokens_per_frame
        )
    s = sigma[:, None, :, None, None]
    x_t = (1 - s) * context + s * eps
    timestep = (sigma * 1000.0).repeat_interleave(tokens_per_frame, dim=1)
    v = transformer(x_t, timestep, embeds, return_dict=False)[0]
    per_frame = (weight * (v - (eps - x0)).pow(2)).mean(dim=(1, 3, 4))
    noisy = (sigma > 0).float()
    loss = (per_frame * noisy).sum() / noisy.sum()
    if adversary is None:
        return loss
    return adversary.generator_loss(loss, v, x_t - s * v, x0, sigma, captions, gen)


# ---------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Everything a run needs to continue: models, their average, optimizer, losses."""

    cfg: TrainGenConfig
    transformer: torch.nn.Module
    text_encoder: Any
    """`streamrt.models.text.TextEncoder`; its model trains with the transformer."""
    codec: Any
    ema: dict[str, torch.Tensor]
    """Average of the trainable weights ("transformer.*", "text.*"): what gets exported."""
    optimizer: torch.optim.Optimizer
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    """Training wall time summed over invocations."""
    compiled: Callable | None = None
    """`torch.compile` of the transformer (same weights), used for the training forward."""
    teacher: Any = None
    """`train_gen_distill.Teacher` of `cfg.distill_from` (not checkpointed: loaded per run)."""
    adversary: Any = None
    """`train_gen_adversarial.Adversary` when `cfg.adversarial_weight` > 0 (checkpointed)."""

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [("transformer." + n, p) for n, p in self.transformer.named_parameters()] + [
            ("text." + n, p) for n, p in self.text_encoder.model.named_parameters()
        ]


def new_state(cfg: TrainGenConfig) -> TrainState:
    """A fresh run: random weights, or those of `cfg.init_from`."""
    if cfg.init_from is not None:
        from streamrt.models.train_gen_resample import init_state

        return init_state(dataclasses.replace(cfg, init_from=None), cfg.init_from)
    if cfg.vae is None:
        transformer, text_encoder, codec = tiny_random_parts(
            VOCAB,
            cfg.text_len,
            codec="pixel",
            seed=cfg.seed,
            spatial=cfg.codec_spatial,
            **cfg.model,
        )
    else:
        transformer, text_encoder, codec = vae_parts(cfg)
    state = TrainState(cfg, transformer, text_encoder, codec, {}, None)  # type: ignore[arg-type]
    params = [p for _, p in state.named_parameters()]
    state.optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay
    )
    state.ema = {n: p.detach().clone() for n, p in state.named_parameters()}
    if cfg.adversarial_weight > 0:
        from streamrt.models.train_gen_adversarial import Adversary

        channels = state.codec.latent_channels
        state.adversary = Adversary(cfg, text_encoder, channels)
    return state


def vae_parts(cfg: TrainGenConfig):
    """Random transformer and text encoder over the latents of the trained VAE `cfg.vae`
    (patch `cfg.vae_patch`), and that VAE's codec."""
    from streamrt.models.codec import WanVAECodec
    from streamrt.models.wan_checkpoints import load_wan_vae

    vae = load_wan_vae(cfg.vae)
    for p in vae.parameters():
        p.requires_grad_(False)
    z = vae.config.z_dim
    p = cfg.vae_patch
    model = {"in_channels": z, "out_channels": z, "patch_size": (1, p, p), **cfg.model}
    # the pixel codec's `spatial=8` gives patch 1 (overridden here); the VAE's codec replaces it
    transformer, text_encoder, _ = tiny_random_parts(
        VOCAB, cfg.text_len, codec="pixel", seed=cfg.seed, spatial=8, **model
    )
    return transformer, text_encoder, WanVAECodec(vae)


def save_checkpoint(state: TrainState, path: Path) -> None:
    """Write `path` atomically (`write_checkpoint`)."""
    blob = {
        "config": dataclasses.asdict(state.cfg),
        "step": state.step,
        "losses": state.losses,
        "seconds": state.seconds,
        "transformer": state.transformer.state_dict(),
        "text": state.text_encoder.model.state_dict(),
        "ema": state.ema,
        "optimizer": state.optimizer.state_dict(),
        "vae_digest": vae_digest(state.codec),
    }
    if state.adversary is not None:
        blob["adversary"] = state.adversary.state_dict()
    write_checkpoint(blob, path)


def load_checkpoint(path: Path, cfg: TrainGenConfig | None = None) -> TrainState:
    """A state from `path`; `cfg` (e.g. more steps) replaces the saved config if given."""
    blob = read_checkpoint(path)
    cfg = cfg or TrainGenConfig(**blob["config"])
    # the saved weights replace any start: `init_from` is not read (it may be gone)
    state = new_state(dataclasses.replace(cfg, init_from=None))
    state.cfg = cfg
    state.transformer.load_state_dict(blob["transformer"])
    state.text_encoder.model.load_state_dict(blob["text"])
    state.optimizer.load_state_dict(blob["optimizer"])
    state.ema = blob["ema"]
    state.step, state.losses, state.seconds = blob["step"], blob["losses"], blob["seconds"]
    if state.adversary is not None and "adversary" in blob:  # else a fresh critic joins
        state.adversary.load_state_dict(blob["adversary"])
    saved = blob.get("vae_digest")
    if saved != vae_digest(state.codec) and saved != vae_digest(state.codec, whole=True):
        raise InputError(
            f"{path}: this run was trained on another VAE than {cfg.vae} now holds (a retrained "
            "or replaced VAE changes the latent space); pass the run's VAE, or --fresh"
        )
    return state


def vae_digest(codec, whole: bool = False) -> str | None:
    """SHA-256 over what defines a VAE codec's latent space, the encoder's weights and the
    latent statistics (None for the pixel codec): a resumed run must denoise the same
    latent space, and a decoder trained anew for that encoder (`train_vae`'s
    `decoder_only`) does not change it. `whole`: over every weight, as checkpoints before
    session 15 recorded it."""
    vae = getattr(codec, "vae", None)
    if vae is None:
        return None
    import hashlib

    from streamrt.models.train_vae import ENCODER_SIDE

    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        if whole or name.startswith(ENCODER_SIDE):
            h.update(name.encode())
            h.update(t.detach().contiguous().numpy().tobytes())
    if not whole:
        h.update(repr((list(vae.config.latents_mean), list(vae.config.latents_std))).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------- loop


def train_step(state: TrainState) -> float:
    """One optimizer step on the clips of `state.step`; returns the loss."""
    cfg = state.cfg
    frames, captions, objects = sample_batch(cfg, state.step)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step)
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(cfg, state.step, state.seconds)
    # the regeneration of `resample_prob` runs the eager model: its batch sizes vary
    model = state.transformer if state.compiled is None else state.compiled
    done = progress(cfg, state.step, state.seconds)
    weight = cfg.object_weight + (cfg.object_weight_final - cfg.object_weight) * done
    loss = flow_matching_loss(
        model,
        state.text_encoder,
        state.codec,
        frames,
        objects,
        captions,
        cfg,
        gen,
        weight,
        sampler=state.transformer,
        teacher=state.teacher,
        adversary=state.adversary,
    )
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for _, p in state.named_parameters()], cfg.grad_clip)
    state.optimizer.step()
    state.step += 1
    update_average(state.ema, state.named_parameters(), cfg, state.step)
    if state.adversary is not None:
        state.adversary.step()
    # with a critic the logged loss stays the regression's, comparable across runs
    state.losses.append(loss.item() if state.adversary is None else state.adversary.last["mse"])
    return state.losses[-1]


def train(
    cfg: TrainGenConfig,
    work_dir: str | Path | None,
    output: str | Path | None = None,
    resume: bool = True,
    log: Callable[[str], None] = print,
) -> TrainState:
    """Train until `cfg.steps` or `cfg.max_minutes` run out, checkpointing to `work_dir`.

    Every checkpoint also exports the averaged weights as a generator directory to
    `output` (if given) and redraws `output/loss.png`, so a run stopped at any point
    leaves a usable model behind.
    """
    import streamrt.gen.generator  # noqa: F401  (loaded now: exports must not fail late)

    with torch_threads(cfg.threads):
        return _train(cfg, work_dir, output, resume, log)


def _train(cfg: TrainGenConfig, work_dir, output, resume: bool, log: Callable) -> TrainState:
    state, ckpt = resume_or_new(cfg, work_dir, resume, load_checkpoint, new_state, log)
    world, patch = world_config(cfg), state.transformer.config.patch_size
    side = state.codec.spatial
    tokens_per_frame = (world.height // side // patch[1]) * (world.width // side // patch[2])
    mask = block_causal_mask(cfg.num_frames, cfg.chunk_frames, tokens_per_frame)
    apply_block_causal(state.transformer, mask)
    if cfg.distill_from:
        from streamrt.models.train_gen_distill import load_teacher

        state.teacher = load_teacher(cfg, cfg.distill_from, state.transformer)
        apply_block_causal(state.teacher.transformer, mask)
    state.transformer.train()
    state.text_encoder.model.eval()  # no dropout; its weights still train
    if cfg.compile:
        state.compiled = torch.compile(state.transformer)
    inherit = inherited_settings(cfg)
    run_steps(state, train_step, lambda st: checkpoint(st, ckpt, output, log, inherit), log)
    state.transformer.eval()
    return state


def checkpoint(
    state: TrainState,
    ckpt: Path | None,
    output: str | Path | None,
    log: Callable = print,
    inherit: dict[str, Any] | None = None,
) -> None:
    """Save the state, then export (`export_generator`'s `inherit`); a failed export is
    reported and training goes on (the checkpoint holds everything, and the next one
    exports again)."""
    if ckpt is not None:
        save_checkpoint(state, ckpt)
    if state.adversary is not None:
        log(
            f"step {state.step} "
            + " ".join(f"{k} {v:.4g}" for k, v in state.adversary.last.items())
        )
    if output is None:
        return
    try:
        export_generator(state, output, inherit=inherit)
        plot_losses(state.losses, Path(output) / "loss.png")
    except Exception as exc:  # the run must outlive a broken export
        log(f"export to {output} failed at step {state.step}: {type(exc).__name__}: {exc}")
