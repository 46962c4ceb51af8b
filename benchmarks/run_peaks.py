"""Measured peak memory and step time of the example configs under a few plans: what `shardwise run`
itself holds and how fast it steps, for comparing one version of the run tier with another.

    python benchmarks/run_peaks.py                         # 2 ranks, the plans below
    python benchmarks/run_peaks.py --plans "dp=2" "pp=2" --set model.vocab=8192

For each example and plan it prints the worst rank's measured peak (MemTracker, MiB), the
estimate's prediction and error, and the median step time with its middle half. Run it from two
checkouts (PYTHONPATH) to compare them; step time on a shared CPU moves with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLANS = ("dp=2", "dp=2 zero=3", 'dp=2 precision="bf16-mixed"', "pp=2", 'pp=2 precision="bf16-mixed"')


def main() -> int:
    import tomllib

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--configs", nargs="*", default=sorted(str(f) for f in (ROOT / "examples").glob("*.toml")))
    p.add_argument("--plans", nargs="*", default=PLANS)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--set", nargs="*", default=[], help="TABLE.FIELD=VALUE overrides for every config")
    a = p.parse_args()

    from shardwise.check.compare import check
    from shardwise.run import config
    from shardwise.spec.hardware import make_cluster

    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; {a.nproc} ranks, {a.steps} steps")
    print(f"{'config':<11} {'plan':<40} {'peak MiB':>9} {'estimate':>9} {'error':>7} {'step ms (q1-q3)':>18}")
    for path in a.configs:
        for text in a.plans:
            ov = {("train", "steps"): (a.steps, "benchmark"), ("train", "nproc"): (a.nproc, "benchmark")}
            for item in [*text.split(), *a.set]:
                k, _, v = item.partition("=")
                key = tuple(k.split(".")) if "." in k else ("plan", k)
                ov[key] = (tomllib.loads(f"v = {v}")["v"], "benchmark")
            cfg = config.load(path, ov)
            rep = check(cfg, "cpu", make_cluster("h100-80gb", a.nproc), calibrated=False)
            peaks = [r for r in rep.judged if r.item == "peak memory"]
            worst = max(peaks, key=lambda r: r.measured)
            t = rep.ranks[0]["measurement"]["time"]
            d = t["detail"]
            name = Path(path).stem.removeprefix("tiny-")
            print(
                f"{name:<11} {cfg.plan.short() + ' ' + cfg.plan.precision:<40} {worst.measured / 2**20:>9.3f} "
                f"{worst.predicted / 2**20:>9.3f} {100 * worst.error:>+6.1f}% "
                f"{t['step_s'] * 1e3:>6.1f} ({d['step_s_q1'] * 1e3:.1f}-{d['step_s_q3'] * 1e3:.1f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
