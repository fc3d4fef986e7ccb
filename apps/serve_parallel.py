"""`streamrt serve --parallel layers` under `torchrun`: the stream endpoints of `streamrt
serve` on a layer pipeline (`streamrt.parallel.serving`). Rank 0 serves HTTP; the other
ranks follow its rounds. A failed or stalled rank ends every stream and the server, which
exits non-zero naming the rank."""

from __future__ import annotations

import argparse
import signal
import threading

import torch.distributed as dist

from streamrt.errors import InputError


def pipeline_runtime(args: argparse.Namespace):
    """This rank's `PipelineRuntime` (every rank loads the model, then keeps its blocks)."""
    from streamrt.apps.arguments import compile_overrides
    from streamrt.apps.generate import load_generator
    from streamrt.parallel.launch import init_from_env
    from streamrt.parallel.layers import LayerPipeline, even_ranges, stage_engine
    from streamrt.parallel.serving import PipelineRuntime

    gen = load_generator(args.model, args.config, compile_overrides(args))
    init_from_env(str(gen.engine.device))
    rank, world = dist.get_rank(), dist.get_world_size()
    blocks = len(gen.engine.transformer.blocks)
    if world > blocks:
        raise InputError(f"--parallel layers needs at most {blocks} ranks (one block each)")
    ranges = even_ranges(blocks, world)
    every = getattr(args, "rebalance_every", None)
    pipe = LayerPipeline(stage_engine(gen.engine, ranges[rank]), ranges, rebalance_every=every)
    return PipelineRuntime(
        pipe,
        qa_model=getattr(args, "qa_model", None),
        agents=getattr(args, "agents", None) or False,
        agent_policy=getattr(args, "agent_policy", "baseline"),
    )


def run_parallel(args: argparse.Namespace) -> int:
    import uvicorn

    from streamrt.apps.serve import GRACE_S, create_app, listen
    from streamrt.parallel.launch import leave_group
    from streamrt.parallel.serving import PipelineFailed

    sock = None
    try:
        rt = pipeline_runtime(args)
        if rt.rank != 0:
            # Ctrl+C reaches every rank (torchrun): rank 0 shuts the server down and tells
            # the others to stop at a round boundary, so they leave no collective half done.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            rt.follow()
            return 0
        sock = listen(args.host, args.port)
        server = uvicorn.Server(
            uvicorn.Config(create_app(rt), log_level="info", timeout_graceful_shutdown=GRACE_S)
        )

        def watch() -> None:  # a failed pipeline stops the server
            while not server.should_exit:
                if rt.error is not None:
                    server.should_exit = True
                threading.Event().wait(0.2)

        threading.Thread(target=watch, daemon=True).start()
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"streamrt serve --parallel layers on {rt.pipe.world} ranks: "
            f"http://{host}:{args.port}/v1/stats (Ctrl+C stops)",
            flush=True,
        )
        server.run(sockets=[sock])
        if rt.error is not None:
            raise PipelineFailed(f"the pipeline group failed: {rt.error}") from rt.error
        return 0
    finally:
        if sock is not None:
            sock.close()
        leave_group()
