"""Training the tiny generator on its own history: `--init-from` and self-resampled context.

Diffusion forcing (`train_gen.py`) only ever shows the model ground-truth context, but a
stream's context is the model's own earlier output, errors included (exposure bias): on
long streams the shapes grow, stick at the edges and dissolve (assets/tiny-world/
TRAINING.md). Self-resampling (Resampling Forcing; Stable-Video-Infinity's error
recycling) trains on what inference feeds the model: with probability `resample_prob`
a clip's first k chunks (k uniform in 1..n-1) become context that the model regenerates
itself, and the later chunks learn their ground-truth velocity given that context.

    ground truth  | c0        | c1        | c2        |
    regenerate    | noise c0 to sigma_r with the clip's (drifting) noise, denoise with the
                  | sampler's deterministic steps; then c1 likewise, seeing regenerated c0
    training      | c0' (t=0) | c1' (t=0) | c2 noisy  |   loss on c2 against ground truth

The regeneration runs without gradients on the training weights (not the average), chunk
by chunk under the block-causal mask, with the shipped sampler's step: the steps of
`resample_timesteps` below sigma_r, re-noising with the model's own noise estimate
(`renoise: predicted`), exactly as `ChunkwiseSampler` does. A regenerated chunk is a
clean context position (t = 0), as the engine's clean refresh writes a finished chunk.

`init_state` starts a fresh run (new optimizer, step 0, the average set to the weights)
from an exported generator directory: the original checkpoint of the shipped model is
gone, so this is how training continues from `assets/tiny-world`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from streamrt.errors import InputError
from streamrt.gen.schedule import predict_x0, renoise, shifted_sigmas


def init_state(cfg, path: str | Path):
    """A new `TrainState` for `cfg` whose transformer and text encoder hold the weights of
    the generator directory `path` (the average starts equal to them).

    With `cfg.vae` (a run on a VAE's latents) the source may be a pixel-codec model of
    another patch and channel count: every weight whose name and shape match is taken
    (the blocks, text and time embeddings: the token grid is the same, one token per 8x8
    pixels), the patch embedding and output projection start fresh.

    Raises:
        InputError: `path` is not a pixel-codec generator of `cfg`'s architecture.
    """
    from streamrt.models.text import TextEncoder
    from streamrt.models.train_gen import new_state
    from streamrt.models.wan_checkpoints import load_wan_transformer

    path = Path(path)
    state = new_state(cfg)
    manifest = _read_json(path / "streamrt.json")
    transplant = getattr(cfg, "vae", None) is not None
    _check_architecture(path, cfg, state.transformer.config, manifest, transplant)
    source = load_wan_transformer(path / "transformer")
    text = TextEncoder.from_pretrained(path, cfg.text_len)
    own_text = state.text_encoder.model.state_dict()
    their_text = text.model.state_dict()
    if {k: v.shape for k, v in own_text.items()} != {k: v.shape for k, v in their_text.items()}:
        raise InputError(f"--init-from {path}: its text encoder does not match the run's")
    if text.tokenizer.get_vocab() != state.text_encoder.tokenizer.get_vocab():
        raise InputError(f"--init-from {path}: its tokenizer's vocabulary is not the world's")
    if transplant:
        own = state.transformer.state_dict()
        taken = {
            k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape
        }
        state.transformer.load_state_dict(taken, strict=False)
    else:
        state.transformer.load_state_dict(source.state_dict())
    state.text_encoder.model.load_state_dict(their_text)
    state.ema = {n: p.detach().clone() for n, p in state.named_parameters()}
    return state


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(
            f"--init-from {path.parent}: not a generator directory ({path.name}: "
            f"{type(exc).__name__})"
        ) from None


def _check_architecture(
    path: Path, cfg, own_config, manifest: dict, transplant: bool = False
) -> None:
    """Refuse, in one line naming the fields, a directory the run would not rebuild
    (`transplant`: its codec, patch and channels may differ)."""
    theirs = _read_json(path / "transformer" / "config.json")
    free = {"in_channels", "out_channels", "patch_size"} if transplant else set()
    diff = config_diff(theirs, own_config, free)
    if transplant:
        pass
    elif manifest.get("codec", "pixel") != "pixel":
        diff.append(f"codec {manifest.get('codec')} (run: pixel)")
    elif manifest.get("codec_spatial", 1) != cfg.codec_spatial:
        diff.append(f"codec_spatial {manifest.get('codec_spatial', 1)} (run: {cfg.codec_spatial})")
    if manifest.get("text_len", 16) != cfg.text_len:
        diff.append(f"text_len {manifest.get('text_len', 16)} (run: {cfg.text_len})")
    if diff:
        raise InputError(
            f"--init-from {path}: its model does not match the run's architecture: "
            + "; ".join(diff)
        )


def config_diff(theirs: dict, own_config, free: set[str] = frozenset()) -> list[str]:
    """ "key theirs (run: ours)" for each public field of the transformer config `own_config`
    that `theirs` (a config.json's dict) holds with another value, `free` fields aside."""
    diff = []
    for key, value in own_config.items():
        if key.startswith("_") or key not in theirs or key in free:
            continue
        ours = json.loads(json.dumps(value))  # tuples as lists, as config.json holds them
        if ours != theirs[key]:
            diff.append(f"{key} {theirs[key]} (run: {ours})")
    return diff


def resample_sigmas(cfg, sigma: torch.Tensor, gen: torch.Generator):
    """Which clips resample and the noise levels they train at.

    Returns `(rows, prefix, sigma_r, sigma)`: the resampled clips `[B]` bool, their number
    of regenerated context chunks `[B]` (1..n-1), the levels their context chunks are
    noised to before regeneration `[B, n]`, and the per-frame levels `[B, F]` with the
    resampled clips' prefix clean (0) and their later chunks noisy (drawn as usual).
    All draws happen whatever the clips, so a run is reproducible from its seed.
    """
    batch, frames = sigma.shape
    n = frames // cfg.chunk_frames
    rows = torch.rand(batch, generator=gen) < cfg.resample_prob
    prefix = torch.randint(1, max(2, n), (batch,), generator=gen)
    lo, hi = cfg.resample_sigma
    sigma_r = lo + (hi - lo) * torch.rand(batch, n, generator=gen)
    u = torch.rand(batch, n, generator=gen)
    s = cfg.sigma_shift
    noisy = (s * u / (1 + (s - 1) * u)).clamp_min(1e-3)
    chunk = torch.arange(n)
    levels = torch.where(chunk[None] < prefix[:, None], torch.zeros_like(noisy), noisy)
    levels = levels.repeat_interleave(cfg.chunk_frames, dim=1)
    if n < 2:  # a single chunk has no context to regenerate
        rows[:] = False
    return rows, prefix, sigma_r, torch.where(rows[:, None], levels, sigma)


@torch.no_grad()
def regenerate_context(
    transformer,
    embeds: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    prefix: torch.Tensor,
    sigma_r: torch.Tensor,
    cfg,
    tokens_per_frame: int,
) -> torch.Tensor:
    """The clips `x0` `[B, C, F, h, w]` with their first `prefix[b]` chunks replaced by the
    model's own regeneration (module docstring); later frames stay as given.

    Chunk i of clip b is noised to `sigma_r[b, i]` with `eps` (the clip's training noise,
    drifting where the clip's is), then denoised by the deterministic sampler over the
    schedule levels below that, attending to the already regenerated chunks 0..i-1 at
    t = 0 (`transformer` carries the block-causal mask of F frames).
    """
    out = x0.detach().clone()
    c = cfg.chunk_frames
    schedule = shifted_sigmas(list(cfg.resample_timesteps), cfg.resample_shift)
    embeds = embeds.detach()
    for i in range(int(prefix.max().item()) if len(prefix) else 0):
        active = torch.nonzero(prefix > i).flatten()
        if not len(active):
            continue
        frames = slice(i * c, (i + 1) * c)
        starts = sigma_r[active, i]
        # each clip's levels: its own start, then the schedule's levels below it
        levels = [[float(s)] + [x for x in schedule if x < float(s) - 1e-6] for s in starts]
        x = renoise(
            out[active, :, frames], eps[active, :, frames], starts[:, None, None, None, None]
        )
        x0_hat = x.clone()
        for j in range(max(len(lv) for lv in levels)):
            go = [r for r, lv in enumerate(levels) if j < len(lv)]
            idx = active[go]
            sig = torch.tensor([levels[r][j] for r in go])
            t = torch.zeros(len(go), out.shape[2])
            t[:, frames] = sig[:, None] * 1000.0
            inp = out[idx].clone()
            inp[:, :, frames] = x[go]
            v = transformer(
                inp, t.repeat_interleave(tokens_per_frame, dim=1), embeds[idx], return_dict=False
            )[0][:, :, frames]
            s5 = sig[:, None, None, None, None]
            pred = predict_x0(x[go], v, s5)
            x0_hat[go] = pred
            nxt = torch.tensor([levels[r][j + 1] if j + 1 < len(levels[r]) else 0.0 for r in go])
            x[go] = renoise(pred, pred + v, nxt[:, None, None, None, None])
        out[active, :, frames] = x0_hat
    return out


def resampled_inputs(
    transformer,
    embeds: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    sigma: torch.Tensor,
    cfg,
    gen: torch.Generator,
    tokens_per_frame: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(context, sigma)`: the clean inputs the loss noises (`x0` except the resampled
    clips' context chunks, which hold the model's regeneration) and its levels."""
    rows, prefix, sigma_r, sigma = resample_sigmas(cfg, sigma, gen)
    if not rows.any():
        return x0, sigma
    idx = torch.nonzero(rows).flatten()
    # the transformer's dropouts are all p = 0: train mode denoises as eval mode does
    regen = regenerate_context(
        transformer,
        embeds[idx],
        x0[idx],
        eps[idx],
        prefix[idx],
        sigma_r[idx],
        cfg,
        tokens_per_frame,
    )
    context = x0.clone()
    context[idx] = regen
    return context, sigma
