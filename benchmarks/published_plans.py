"""Published large-run plans beside the search's best: can the plan space express what the best
teams ran, and does the search find something at least as fast by its own estimate?

Run: python benchmarks/published_plans.py

For each run: the published plan's estimate (megatron profile: these runs used Megatron-style
engines, bf16 weights and a distributed optimizer, not PyTorch's autocast over fp32 weights; its
model, GPUs, sequence and global batch), then `shardwise plan --profile megatron` with the same
model, GPUs, sequence and batch pinned and everything else open; the search's best must be at least as fast as the published plan's estimate (exit 1
otherwise). A published plan that does not fit the estimate's memory (with the search's 10%
headroom) is shown as such: the search cannot rank it.

The runs (the estimate's numbers for the same split, not the papers' measured throughput, which
is printed beside them):
- Llama 3.1 405B, TP 8 x PP 16 on 16,384 and 8,192 H100s, seq 8192, 16M tokens per step
  (Llama 3 paper, Dubey et al. 2024, Table 4: DP 128 x 16 and DP 64 x 32 sequences; 126 layers:
  15 stages of 8 and one of 6 here, as the paper's first and last stages held fewer). The paper
  runs interleaved 1F1B; uneven stages are modeled for 1F1B, which is what is estimated here.
  Its long-context stage, TP 8 x CP 16 x PP 16 x DP 8 on 16,384 H100s at 131,072 tokens, 16M
  tokens per step (ibid., Table 4; context parallelism by all-gathered K/V, Sec. 3.3.2).
- GPT-3 175B, TP 8 x PP 12 (model-parallel size 96), batch 1536, on 1,536 A100s (Narayanan et
  al. 2021, Table 2, PTD-P rows).
- MT-NLG 530B-class (105 layers, hidden 20480, 128 heads), TP 8 x PP 35 on 2,520 A100s, batch
  2520 (ibid., Table 1); GPT 1T (128 layers, hidden 25600, 160 heads), TP 8 x PP 64 on 3,072
  A100s, batch 3072 (ibid., Table 1). Both: vocabulary 51,200, seq 2048, full recompute,
  interleaved 1F1B in the paper (plain 1F1B here when the layers do not split over pp*v).
- DeepSeek-V3 (671B, 37B active), PP 16 x EP 64 inside DP 128 (ZeRO-1) on 2,048 H800s, seq 4096,
  batch 15,360 (DeepSeek-V3 technical report, arXiv 2412.19437, §3.2 "16-way PP, 64-way EP spanning
  8 nodes, and ZeRO-1 DP"; §4.2 batch). Estimated with 1F1B (DualPipe, which hides the all-to-all
  behind compute, is not modeled: the estimate counts it exposed), full recompute (the paper
  recomputes RMSNorm and MLA's up-projections and caches activations in FP8, which the estimate
  does not model; without recompute its activations do not fit) and bf16 (the paper trains in FP8);
  the paper's figure, 180K H800 GPU-hours per trillion tokens, is 3.16M tokens/s on 2,048 GPUs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys
import time

from shardwise import make_cluster, preset
from shardwise.errors import ShardwiseError
from shardwise.estimate import estimate
from shardwise.search.core import run_search
from shardwise.spec.plan import Plan

PROFILE = "megatron"
GPT = preset("gpt-3-175b")
# Narayanan et al. 2021, Table 1: GPT models of vocabulary 51,200 and sequence 2048
MT_NLG = GPT.scaled(name="gpt-530b-narayanan", layers=105, hidden=20480, heads=128, vocab=51200)
GPT_1T = GPT.scaled(name="gpt-1t-narayanan", layers=128, hidden=25600, heads=160, vocab=51200)

RUNS = [  # (label, model, gpu, gpus, published plan, published figure)
    (
        "Llama 3.1 405B, 16,384 H100",
        preset("llama-3.1-405b"),
        "h100-80gb",
        16384,
        Plan(tp=8, pp=16, dp=128, zero=1, mbs=1, gbs=2048, seq=8192),
        "400 TFLOP/s/GPU, 41% MFU (Table 4)",
    ),
    (
        "Llama 3.1 405B, 8,192 H100",
        preset("llama-3.1-405b"),
        "h100-80gb",
        8192,
        Plan(tp=8, pp=16, dp=64, zero=1, mbs=1, gbs=2048, seq=8192),
        "430 TFLOP/s/GPU, 43% MFU (Table 4)",
    ),
    (
        "Llama 3.1 405B 131K, 16,384 H100",
        preset("llama-3.1-405b"),
        "h100-80gb",
        16384,
        # the long-context stage: CP 16 (K/V all-gathered, Sec. 3.3.2), 16 sequences per DP rank; its TP
        # shards the sequence between blocks (Megatron-style, Sec. 3.3.2)
        Plan(tp=8, cp=16, pp=16, dp=8, zero=1, mbs=1, gbs=128, seq=131072, sp=True),
        "380 TFLOP/s/GPU, 38% MFU (Table 4)",
    ),
    (
        "GPT-3 175B, 1,536 A100",
        GPT,
        "a100-80gb",
        1536,
        Plan(tp=8, pp=12, dp=16, zero=1, mbs=1, gbs=1536, seq=2048, recompute="full"),
        "141 TFLOP/s/GPU (Table 2)",
    ),
    (
        "GPT 530B, 2,520 A100",
        MT_NLG,
        "a100-80gb",
        2520,
        Plan(tp=8, pp=35, dp=9, zero=1, mbs=1, gbs=2520, seq=2048, recompute="full"),
        "163 TFLOP/s/GPU, 52% of peak (Table 1)",
    ),
    (
        "DeepSeek-V3, 2,048 H800",
        preset("deepseek-v3"),
        "h800-80gb",
        2048,
        Plan(pp=16, dp=128, ep=64, zero=1, mbs=1, gbs=15360, seq=4096, recompute="full"),
        "180K H800 GPU-hours per trillion tokens = 3.16M tokens/s (§1, Table 1)",
    ),
    (
        "GPT 1T, 3,072 A100",
        GPT_1T,
        "a100-80gb",
        3072,
        Plan(tp=8, pp=64, dp=6, zero=1, mbs=1, gbs=3072, seq=2048, recompute="full"),
        "163 TFLOP/s/GPU, 52% of peak (Table 1)",
    ),
]


def main() -> int:
    failed = 0
    print(f"{'run':<30} {'plan':<52} {'tokens/s':>12} {'MFU':>6} {'GiB/GPU':>8}")
    for label, model, gpu, gpus, plan, figure in RUNS:
        cluster = make_cluster(gpu, gpus)
        try:
            pub = estimate(model, cluster, plan, PROFILE)
        except ShardwiseError as e:
            print(f"{label:<30} published plan not expressible: {e}")
            failed += 1
            continue
        fits = pub.memory.total <= 0.9 * pub.memory.capacity
        t0 = time.perf_counter()
        res = run_search(model, cluster, top=1, profile=PROFILE, seq=plan.seq, gbs=plan.gbs, precision=plan.precision)
        wall = time.perf_counter() - t0
        best = res.ranked[0] if res.ranked else None
        for tag, e in (("published", pub), ("search's best", best)):
            if e is None:
                print(f"{label:<30} {tag}: nothing fits")
                continue
            gib = e.memory.total / 2**30
            print(
                f"{label if tag == 'published' else '':<30} {e.plan.short():<52} "
                f"{e.time.tokens_per_s:>12,.0f} {e.time.mfu:>6.1%} {gib:>8.1f}"
                + ("" if tag != "published" or fits else "  (over 90% of memory: not rankable)")
            )
        faster = best is not None and best.time.tokens_per_s >= pub.time.tokens_per_s * (1 - 1e-12)
        print(
            f"{'':<30} paper: {figure}; search {wall:.1f} s wall, {res.tally.estimated:,} plans estimated; "
            + ("best >= published" if faster else "BEST IS SLOWER THAN THE PUBLISHED PLAN")
        )
        failed += not faster
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
