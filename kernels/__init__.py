"""Attention and RoPE backends (installed as streamrt.kernels).

Import them only through this package: optional GPU kernels (FlexAttention,
xformers, flash-attn, Triton) are chosen here, behind one gate, so the rest of the
runtime never imports them directly.
"""

import sys

if __name__ == "kernels":  # pragma: no cover - exercised by tests/unit/test_fresh_install.py
    # The repository root is on sys.path (`python -m pytest`, `python -m streamrt.apps.cli`
    # from a checkout), so this folder was found as the top-level `kernels`: the name of
    # the PyPI package that transformers imports. Hand the name over to that package (or
    # report it missing) instead of shadowing it; streamrt itself imports this folder only
    # as `streamrt.kernels`.
    import importlib.util
    import os
    from importlib.machinery import PathFinder

    _root = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
    _others = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _root]
    _spec = PathFinder.find_spec(__name__, _others)
    if _spec is None or _spec.loader is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _real = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _real  # the import system returns what sys.modules holds
    _spec.loader.exec_module(_real)
else:
    from streamrt.kernels.attention import (
        BACKENDS,
        attend,
        available_backends,
        sdpa,
        set_attention_backend,
    )
    from streamrt.kernels.rope import (
        WanKeyRope,
        apply_rope,
        apply_wan_rope,
        rope_frequencies,
        rotate,
        wan_rope_cos_sin,
        wan_rope_halves,
        wan_rope_rotation,
    )

    __all__ = [
        "BACKENDS",
        "WanKeyRope",
        "apply_rope",
        "apply_wan_rope",
        "attend",
        "available_backends",
        "rope_frequencies",
        "rotate",
        "sdpa",
        "set_attention_backend",
        "wan_rope_cos_sin",
        "wan_rope_halves",
        "wan_rope_rotation",
    ]
