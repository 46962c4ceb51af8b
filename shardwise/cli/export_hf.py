"""`shardwise export-hf CHECKPOINT --out DIR`: a run's checkpoint as a Hugging Face model directory.

Imports no torch until the command runs (see shardwise/cli/__init__.py)."""

from __future__ import annotations

import argparse

from shardwise.errors import ShardwiseError
from shardwise.paths import check_output_dir
from shardwise.run import checkpoint_dir as layout


def register(sub) -> None:
    s = sub.add_parser(
        "export-hf",
        help="write a run's checkpoint as model.safetensors + config.json that transformers loads",
        description="Export the parameters of a `shardwise run` checkpoint (saved under any plan) as a Hugging "
        "Face model directory: LlamaForCausalLM or GPT2LMHeadModel, fp32, no optimizer state.",
    )
    s.add_argument("checkpoint", help="a step-NNNNNN checkpoint directory, or a --checkpoint-dir (its newest)")
    s.add_argument("--out", required=True, metavar="DIR", help="directory for model.safetensors and config.json")
    s.set_defaults(func=cmd_export_hf)


def cmd_export_hf(a: argparse.Namespace) -> int:
    path = layout.resolve(a.checkpoint, "", "export-hf")  # a missing checkpoint fails before anything else
    check_output_dir(a.out, "--out")
    try:
        import safetensors  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        raise ShardwiseError("`shardwise export-hf` needs PyTorch and safetensors: pip install -e '.[hf]'") from None
    from shardwise.run.export_hf import export

    export(str(path), a.out)
    print(f"exported {path} to {a.out}/ (model.safetensors, config.json)")
    return 0
