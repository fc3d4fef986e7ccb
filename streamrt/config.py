"""Typed configuration: one dataclass per subsystem, every field defaulted and documented.

YAML presets in `configs/` only fill these in. `load_config` rejects unknown keys and
wrong types with a message that names the key and the file.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from streamrt.embedded import resolve_shipped
from streamrt.errors import InputError, StreamrtError

T = TypeVar("T")

CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = typing.get_args(CompileMode)
"""`gen.compile`'s values: off, or a `torch.compile` mode (`streamrt.gen.compiled`)."""

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | str, what: str = "size") -> int:
    """Parse 1048576, "512MiB", "2 GB" into a byte count."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InputError(f"{what} must be >= 0, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(
            f"{what}: cannot read {value!r} as a size; write e.g. 4096, '512MiB' or '2GiB'"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class CacheConfig:
    """Budgets and behaviour of the one `CacheManager` of a process."""

    device_bytes: int | str = "1GiB"
    """Byte budget of the device tier (the model's device: GPU memory, or RAM on CPU)."""

    host_bytes: int | str = "2GiB"
    """Byte budget of the host tier (pinned RAM when CUDA is present)."""

    disk_bytes: int | str | None = None
    """Byte budget of the disk tier; None: limited only by the disk."""

    disk_dir: str | None = None
    """Directory of the disk tier; None disables it (blocks leaving the host are dropped)."""

    page_bytes: int | str = 0
    """Size of one pool page (one block of any consumer). 0: the largest block among
    consumers registered before the first allocation."""

    pin_host_memory: bool = True
    """Pin the host pool when CUDA is available, so device<->host copies run asynchronously."""

    device: str | None = None
    """Device of the device tier ("cuda", "cuda:1", "cpu"); None: CUDA if available, else CPU."""

    def __post_init__(self) -> None:
        self.device_bytes = parse_bytes(self.device_bytes, "cache.device_bytes")
        self.host_bytes = parse_bytes(self.host_bytes, "cache.host_bytes")
        self.page_bytes = parse_bytes(self.page_bytes, "cache.page_bytes")
        if self.disk_bytes is not None:
            self.disk_bytes = parse_bytes(self.disk_bytes, "cache.disk_bytes")


@dataclass
class GenConfig:
    """A generation stream: sampler, schedule, cache policy, resolution."""

    sampler: Literal["chunkwise", "rolling", "stream_batch"] = "chunkwise"
    """chunkwise: Self-Forcing loop; rolling: Rolling Forcing joint window; stream_batch:
    one batched forward per chunk with every denoising step in flight."""

    timesteps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    """Denoising timesteps (0-1000) before the shift warp; their number is the step count."""

    shift: float = 5.0
    """Timestep shift `s`: sigma = s*u / (1 + (s-1)*u), u = t/1000."""

    chunk_frames: int = 3
    """Latent frames generated per chunk (3 in Self-Forcing, 1 in StreamDiffusionV2)."""

    renoise: Literal["fresh", "predicted"] = "fresh"
    """Between steps, re-noise the x0 estimate with fresh noise (distilled few-step models:
    Self-Forcing, CausVid) or with the model's own noise estimate `x0 + v` (a deterministic
    flow-matching Euler step, for models trained without distillation)."""

    noise_drift: float = 0.0
    """Motion prior for text-to-video (`streamrt.gen.noise`): one noise field per stream,
    frame k's initial noise is it rolled by k x this many latent pixels along the prompt's
    direction word ("moving left", "panning up"); 0 or a prompt without such a word:
    independent noise per frame. Pair with `renoise: predicted`, which keeps the noise."""

    noise_drift_frames: int | None = None
    """Frames from the stream's start whose noise drifts (None: every frame)."""

    clean_refresh: bool = True
    """After a chunk is finished, rewrite its K/V with one forward at t=0 on the clean frames."""

    fold_refresh: bool = True
    """Chunk-wise sampler: run that refresh as the first row of the next chunk's first
    forward (block-causal, `streamrt.gen.fold`): one forward fewer per chunk, each chunk's
    frames out one forward sooner, the same latents. Policies that act on writes or
    evictions (participative, ema_sink, the adaptive sink) keep the separate refresh."""

    overlap_decode: bool = True
    """`StreamGenerator.stream`: decode chunk k in a thread of its own while chunk k+1 is
    denoised (`streamrt.gen.decoding`); the same frames in the same order. A prompt
    switched while chunk k's frames are handed out applies from chunk k+2 (k+1 is already
    denoised) instead of k+1. False: denoise, decode, hand out, one chunk at a time."""

    compile: CompileMode = "off"
    """`torch.compile` the transformer's streaming forward in this mode (one engine-wide
    setting, `streamrt.gen.compiled`): whole, no graph breaks, its graphs built while a
    stream's window fills (seconds each on a CPU), then no recompiles; outputs equal eager
    within float32 rounding."""

    policy: str = "sink_window"
    """Cache policy name (see streamrt.cache.POLICIES). Switched without `policy_args`, the
    new policy starts from its own default arguments."""

    policy_args: dict = field(default_factory=lambda: {"sink_blocks": 3, "window_blocks": 18})
    """Arguments of the policy, in latent frames (one block = one latent frame). A window
    left unset grows to hold the frames the sampler keeps in flight (chunk_frames, or
    steps x chunk_frames for rolling / stream_batch); one set too small is refused."""

    height: int = 64
    """Output height in pixels."""

    width: int = 64
    """Output width in pixels."""

    fps: int = 16
    """Frame rate written to video files."""

    seed: int = 0
    """Seed of the stream's noise (streams are deterministic for a seed)."""

    guidance_scale: float = 1.0
    """Classifier-free guidance scale; 1.0 disables guidance (distilled checkpoints)."""

    negative_prompt: str = ""
    """Prompt of the unconditional branch when guidance is on."""

    rcfg: bool = False
    """Residual CFG (StreamDiffusion's self-negative): with guidance on, the noise that made
    the current latents stands in for the unconditional prediction, so guidance costs no
    extra forward and no second cache."""

    similarity_threshold: float = 0.98
    """Video-to-video: input frames this similar (cosine) to the last processed one are
    skipped with probability max(0, 1 - (1 - cos) / (1 - threshold)) (StreamDiffusion)."""

    max_skipped_frames: int = 10
    """Video-to-video: process an input frame after this many consecutive skips."""

    v2v_strength: float = 0.8
    """Video-to-video base noise strength s0 of the motion-aware controller."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the transformer and the KV cache."""

    kv_dtype: Literal["auto", "float8_e4m3fn", "float8_e5m2"] = "auto"
    """Storage dtype of the self-attention KV blocks: auto: `dtype`; float8_e4m3fn /
    float8_e5m2: one byte per value (half of bf16's KV memory), rounded and saturated on
    write, upcast to `dtype` when attention reads them."""

    attention: Literal["sdpa", "flex", "xformers", "flash"] = "sdpa"
    """Attention backend (streamrt.kernels); sdpa is the reference the others match."""

    device: str | None = None
    """Device for the models; None: CUDA if available, else CPU."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise an `InputError` naming the first field whose value cannot work.

        Runs on construction and on `dataclasses.replace`, so presets, command-line
        overrides and Python callers all get the same checks. Whether the resolution fits
        the model and the device exists are checked where the model is known (`GenEngine`).
        """
        check_types(self, "gen")
        if not self.timesteps:
            raise InputError("gen.timesteps is empty: give at least one step, e.g. [1000, 500]")
        if bad := [t for t in self.timesteps if not 0 < t <= 1000]:
            raise InputError(f"gen.timesteps must lie in 1..1000, got {bad}")
        _at_least(self, "gen", chunk_frames=1, height=1, width=1, max_skipped_frames=0)
        if self.noise_drift_frames is not None:
            _at_least(self, "gen", noise_drift_frames=0)
        _finite(self, "gen", "shift", "noise_drift", "guidance_scale")
        _finite(self, "gen", "fps", "similarity_threshold", "v2v_strength")
        if self.fps <= 0:
            raise InputError(f"gen.fps must be > 0 frames per second, got {self.fps}")
        if self.shift <= 0:
            raise InputError(f"gen.shift must be > 0, got {self.shift}")
        for name in ("similarity_threshold", "v2v_strength"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"gen.{name} must lie in [0, 1], got {getattr(self, name)}")


def check_types(obj: Any, section: str) -> None:
    """Raise an `InputError` naming the first field of dataclass `obj` of the wrong type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if problem := _type_problem(f.name, getattr(obj, f.name), hints[f.name]):
            raise InputError(f"{section}.{f.name}{problem}")


def _at_least(obj: Any, section: str, **minimum: int) -> None:
    for name, low in minimum.items():
        if getattr(obj, name) < low:
            raise InputError(f"{section}.{name} must be >= {low}, got {getattr(obj, name)}")


def _finite(obj: Any, section: str, *names: str) -> None:
    for name in names:
        if not math.isfinite(getattr(obj, name)):
            raise InputError(f"{section}.{name} must be a finite number, got {getattr(obj, name)}")


@dataclass
class QAConfig:
    """A streaming video QA session (ReKV memory on the cache manager)."""

    system_prompt: str = ""
    """Text prefilled once at the start of a session; its tokens are the attention sink."""

    question_template: str = "{question}"
    """How a question is put to the model; `{question}` is replaced by the user's text."""

    window_frames: int = 8
    """Frames (blocks) a new frame attends to, itself included, after the sink."""

    retrieve_frames: int = 8
    """Frames retrieved per layer for a question (ReKV's r); all of them if fewer exist."""

    group_frames: int = 1
    """Retrieve frames in groups of this many consecutive frames (ReKV's b)."""

    retrieval: Literal["internal", "external"] = "internal"
    """internal: question queries . block summary keys, per layer (ReKV); external: cosine
    of the question's mean token embedding and each frame's mean visual embedding."""

    per_layer: bool = True
    """Each layer scores frames with its own queries and keys (ReKV); False: one score per
    frame, the layers' scores summed."""

    layer_selection: Literal["consensus", "independent"] = "consensus"
    """With `per_layer`: consensus: one selection for every layer, the frames most layers
    rank in their top `retrieve_frames` (a coherent context, as the model saw in training);
    independent: each layer attends to its own top frames (ReKV as published). Measured
    on the embedded model in assets/tiny-vqa/TRAINING.md ("Needles in long streams")."""

    max_new_tokens: int = 16
    """Default answer length in tokens (greedy decoding stops earlier at end-of-sequence)."""

    fps: float = 1.0
    """Frame rate assumed for frames fed without a timestamp."""

    resize: bool = True
    """Resize frames of another size to the model's input size (bilinear, antialiased, as
    the transformers image processors do); False refuses them instead."""

    max_question_tokens: int = 512
    """Longest question accepted, in tokens (after `question_template`); longer ones are
    refused before they hold the session, since prefill time grows with their length."""

    session: str = "default"
    """Name of the session's sequence; a `memory_dir` may hold several sessions."""

    device_bytes: int | str = "256MiB"
    """Device-tier budget of the session's own cache manager (ignored with a shared one)."""

    host_bytes: int | str = "1GiB"
    """Host-tier budget of the session's own cache manager."""

    disk_bytes: int | str | None = None
    """Disk-tier budget under `memory_dir`; None: limited only by the disk."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the model and of the KV blocks."""

    device: str | None = None
    """Device for the model; None: CUDA if available, else CPU."""


@dataclass
class RuntimeConfig:
    """The engine that serves many streams and QA sessions (`streamrt.runtime.Runtime`)."""

    scheduler: Literal["deadline", "fcfs"] = "deadline"
    """deadline: the most urgent stream first (least playout slack), batched with as many
    others as its deadline allows (late streams all share one forward: none has a deadline
    left to protect); streams ahead of playout by `ahead_s` wait; admission
    control. fcfs: first come first served, every stream as fast as it goes, no admission
    (the baseline)."""

    max_batch: int = 8
    """Most streams whose steps share one transformer forward."""

    fps: float | None = None
    """Playout rate of a stream that names none; None: `gen.fps`."""

    ttff_s: float = 1.0
    """Time-to-first-frame target: frame i of a stream is due `ttff_s + i / fps` after it
    was opened."""

    ahead_s: float = 1.0
    """A stream whose next frame is due later than this waits (deadline scheduler): the
    compute goes to streams that need it."""

    admission: bool = True
    """Refuse (or queue, see `queue_s`) a stream that the measured capacity cannot serve
    next to the admitted ones (deadline scheduler only)."""

    headroom: float = 0.85
    """Share of the measured capacity that admission control gives out."""

    queue_s: float = 10.0
    """How long a stream that does not fit waits for room (state "waiting") before it fails
    with `AdmissionError`; 0: refused at once."""

    suspend_late_s: float = 1.0
    """Overload's degrade order (deadline scheduler): when the most urgent stream is this
    many seconds late, first the lowest-priority stream (the latest among equals) still at
    full quality runs fewer denoising steps (`degrade_steps`); when every stream that can
    is degraded, the lowest-priority one is suspended: its KV moves to the host tier and
    its playout clock stops. Recovery runs the other way when admission control has room:
    suspended streams resume first (KV back on the device, bit-exact), then degraded
    streams get their full steps back, highest priority first. At most one change per this
    many seconds. 0: never degrade or suspend."""

    degrade_steps: int = 2
    """Denoising steps a degraded stream runs (its schedule thinned evenly, the first,
    pure-noise step kept), from its next chunk; chunk-wise text-to-video streams with more
    steps than this only (a window sampler's chunks in flight keep their schedules). 0:
    never degrade, suspend at once."""

    max_streams: int = 64
    """Most live generation streams and QA sessions, each."""

    qa_queue_frames: int = 64
    """Frames a QA session's feed queue holds before it drops (see `qa_drop`)."""

    qa_drop: Literal["oldest", "newest"] = "oldest"
    """When a QA session's feed queue is full: drop the oldest queued frame (the memory
    follows the live edge) or the newest one (the memory keeps every frame up to a gap)."""

    def validate(self) -> None:
        if self.max_batch < 1:
            raise InputError(f"runtime.max_batch must be >= 1, got {self.max_batch}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise InputError(f"runtime.fps must be a number > 0 or null, got {self.fps}")
        if isinstance(self.degrade_steps, bool) or not isinstance(self.degrade_steps, int):
            raise InputError(
                f"runtime.degrade_steps must be a whole number, got {self.degrade_steps!r}"
            )
        if self.degrade_steps < 0:
            raise InputError(f"runtime.degrade_steps must be >= 0, got {self.degrade_steps}")
        for name in ("ttff_s", "ahead_s", "queue_s", "suspend_late_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"runtime.{name} must be a number >= 0, got {value}")
        if not (0 < self.headroom <= 1):
            raise InputError(f"runtime.headroom must be in (0, 1], got {self.headroom}")
        if self.max_streams < 1 or self.qa_queue_frames < 1:
            raise InputError("runtime.max_streams and runtime.qa_queue_frames must be >= 1")


@dataclass
class StreamrtConfig:
    """All subsystems; a YAML preset fills any subset of these sections."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    """The KV-cache manager."""

    gen: GenConfig = field(default_factory=GenConfig)
    """Streaming generation."""

    qa: QAConfig = field(default_factory=QAConfig)
    """Streaming video question answering."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """The engine serving many streams and sessions at once."""


class ConfigError(StreamrtError, ValueError):
    """A config file has an unknown key or a value of the wrong type."""


_REMOVED = {
    "bench": "the 'bench' section is gone (nothing read it): give `streamrt bench` its "
    "settings as flags (--repeats, --json); delete the section",
}
"""Sections presets once had, with what to do instead (instead of a bare 'unknown key')."""


def _type_problem(name: str, value: Any, tp: Any) -> str | None:
    """What is wrong with `value` for field `name` of type `tp`, as the end of a message
    after the field's name (": unknown ..." or " must be ..."); None if it fits."""
    if _type_ok(value, tp):
        return None
    if typing.get_origin(tp) is Literal:
        choices = ", ".join(map(str, typing.get_args(tp)))
        return f": unknown {name} {value!r}; choose one of {choices}"
    return f" must be {_describe(tp)}, got {value!r} ({type(value).__name__})"


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return (
            isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
            if args
            else True
        )
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, checking every key and type.

    Raises:
        ConfigError: naming the dotted key and `source` for unknown keys and wrong types.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: section '{prefix or '<top>'}' must be a mapping, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields and not prefix and key in _REMOVED:
            raise ConfigError(f"{source}: {_REMOVED[key]}")
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key '{dotted}'; known keys here: {', '.join(fields)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, source, dotted + ".")
        elif problem := _type_problem(key, value, tp):
            raise ConfigError(f"{source}: key '{dotted}'{problem}")
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _read_yaml(path: str | Path) -> tuple[Path, dict[str, Any]]:
    path = resolve_shipped(path)  # configs/X.yaml: the shipped preset, from any directory
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset is a mapping of sections (gen:, cache:, ...)")
    return path, data


def load_config(path: str | Path | None = None, cls: type[T] = StreamrtConfig) -> T:  # type: ignore[assignment]
    """Read a YAML preset into `cls` (defaults for everything it does not set)."""
    if path is None:
        return cls()
    path, data = _read_yaml(path)
    return from_dict(cls, data, str(path))


def read_preset(path: str | Path) -> tuple[StreamrtConfig, dict[str, dict[str, Any]]]:
    """A preset, checked, and the keys it sets: `(config, {section: {key: value}})`.

    The second part tells what the file actually says, apart from the defaults filling in
    the rest: a preset's value wins over a model's own setting even where it equals the
    dataclass default.
    """
    path, data = _read_yaml(path)
    cfg = from_dict(StreamrtConfig, data, str(path))
    return cfg, {
        section: {k: getattr(getattr(cfg, section), k) for k in (data.get(section) or {})}
        for section in data
    }


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a config dataclass (the string literal under each field)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        documented = isinstance(nxt, ast.Expr) and isinstance(
            getattr(nxt, "value", None), ast.Constant
        )
        if documented and isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            docs[node.target.id] = str(nxt.value.value).strip()
    return docs
