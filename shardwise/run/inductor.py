"""torch.compile in `shardwise run`: each transformer block compiled by inductor, as torchtitan does
(torchtitan/models/llama3/infra/parallelize.py, apply_compile: per block, fullgraph, after tensor
parallelism and activation checkpointing, before FSDP), and the one-line refusals where it cannot.

Each block's forward is compiled in place (not wrapped in an OptimizedModule, whose `_orig_mod.`
would rename every parameter: names seed the initial weights and key the checkpoints). The hooks
FSDP2 and the pipeline put on the block run outside the compiled graph, around it.
"""

from __future__ import annotations

import os
import sysconfig

import torch
from torch import nn

from shardwise.errors import ShardwiseError

_KEEP = "or leave --compile out"


def missing_compiler(device: torch.device) -> str | None:
    """What inductor lacks on this device, one line with the fix; None when it can compile. Probed
    once, cheaply: on CUDA triton imports; on the CPU inductor's own C++ compiler search (which
    runs `CXX --version`) and the Python headers its kernels include."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return f"--compile on CUDA needs triton (inductor's GPU kernels): pip install triton; {_KEEP}"
        return None
    from torch._inductor import config
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # inductor raises InvalidCxxCompiler, or an OSError from the search
        cxx = os.environ.get("CXX") or config.cpp.cxx[-1]
        return (
            f"--compile on the CPU needs a C++ compiler for inductor's kernels ({cxx} not found): install g++ "
            f"(apt-get install g++) or set CXX; {_KEEP}"
        )
    include = sysconfig.get_paths().get("include", "")
    if not os.path.exists(os.path.join(include, "Python.h")):
        return (
            f"--compile on the CPU needs the Python headers inductor's kernels include (no Python.h in {include}): "
            f"install python3-dev; {_KEEP}"
        )
    return None


def check_compile(plan, device: torch.device) -> None:
    """The plan's --compile where this run cannot do it, one line; else nothing."""
    if not plan.compile:
        return
    if plan.tp > 1:
        # the compiled block hands DTensor's redistribute (eager, outside it) a plain gradient:
        # AttributeError '_local_tensor' in its backward (torch 2.13, dp/ZeRO compile fine)
        raise ShardwiseError(
            f"--compile with --tp {plan.tp}: PyTorch's DTensor fails in the backward of a compiled block here; "
            "use --compile with dp, ZeRO and pp, or leave --compile out for tensor parallel"
        )
    why = missing_compiler(device)
    if why:
        raise ShardwiseError(why)


def apply_compile(model: nn.Module) -> None:
    """torch.compile every transformer block's forward (inductor, one graph per block: a break is
    an error, as torchtitan's fullgraph=True). The blocks share code and shapes, so the first
    compiles and the others reuse its kernels."""
    for block in model.layers.values():
        block.forward = torch.compile(block.forward, fullgraph=True)
