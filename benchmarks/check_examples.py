"""`shardwise check` on every example config and a matrix of plans: the errors docs/accuracy.md quotes.

For each example in examples/ and each plan: predict (torch profile), run with measurement on,
compare. Prints, per plan, the peak-memory error of each judged rank, the largest model-state
error, whether every collective matched exactly, and with --time the step-time error against a
hardware file calibrated once per config on this many ranks (`shardwise calibrate --config`:
matmuls at the config's shapes, every engine's host time), as a user would: calibrate, then
check any plan.

    python benchmarks/check_examples.py                       # 2 ranks, the plans below
    python benchmarks/check_examples.py --nproc 4 --plans "dp=2 tp=2" "dp=2 pp=2" "tp=2 pp=2"
    python benchmarks/check_examples.py --time                # also calibrate and judge step time

Not a unit test (tests/test_check.py is): step time on a shared CPU moves with whatever else
runs, so its figures are printed with the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from shardwise.cli.check import DEFAULT_STEPS  # noqa: E402

PLANS = {
    2: ("dp=2", "dp=2 zero=1", "dp=2 zero=2", "dp=2 zero=3", "tp=2", "tp=2 sp=true", 'pp=2 schedule="gpipe"', "pp=2"),
    4: (
        "dp=2 tp=2",
        "dp=2 tp=2 sp=true",
        "dp=2 tp=2 zero=3",
        "dp=2 pp=2",
        "tp=2 pp=2",
        'tp=2 pp=2 schedule="interleaved" vpp=2',
    ),
}


def _overrides(text: str) -> dict:
    import tomllib

    out = {}
    for item in text.split():
        k, _, v = item.partition("=")
        out[("plan", k)] = (tomllib.loads(f"v = {v}")["v"], "benchmark")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--configs", nargs="*", default=sorted(str(f) for f in (ROOT / "examples").glob("*.toml")))
    p.add_argument("--plans", nargs="*", default=None)
    p.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"steps per check (default {DEFAULT_STEPS}, as `check`)"
    )
    p.add_argument("--time", action="store_true", help="calibrate for each config and plan, judge step time")
    a = p.parse_args()

    from shardwise.check.calibrate import calibrate, model_shapes
    from shardwise.check.compare import check
    from shardwise.errors import ShardwiseError
    from shardwise.run import config
    from shardwise.spec.hardware import make_cluster

    plans = a.plans or PLANS.get(a.nproc, ("",))
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; {a.nproc} ranks, {a.steps} steps")
    print(
        f"{'config':<11} {'plan':<32} {'peak error by judged rank':<30} {'states':>7} {'comm':>6}"
        + (f" {'step time':>22}" if a.time else "")
    )
    passed = total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in a.configs:
            cal = None
            for text in plans:
                ov = _overrides(text) | {
                    ("train", "steps"): (a.steps, "benchmark"),
                    ("train", "nproc"): (a.nproc, "benchmark"),
                }
                name = Path(path).stem.removeprefix("tiny-")
                try:
                    cfg = config.load(path, ov)
                    cluster, eff = make_cluster("h100-80gb", a.nproc), None
                    if a.time and cal is None:
                        base = config.load(path, {("train", "nproc"): (a.nproc, "benchmark")})
                        load = os.getloadavg()[0]
                        cal = calibrate(
                            a.nproc,
                            "cpu",
                            name="bench",
                            shapes=model_shapes(base.model, base.plan),
                            shapes_text="the model",
                            model=(base.model, base.plan),
                        )
                        hw = Path(tmp) / "bench.toml"
                        hw.write_text(cal.toml())
                        print(
                            f"calibrated {Path(path).name} on {a.nproc} ranks (load average {load:.1f} before): "
                            f"efficiency {cal.efficiency:.2f}, host us per block "
                            + ", ".join(f"{e} {t['block']:,.0f}" for e, t in cal.host_us.items()),
                            flush=True,
                        )
                    if a.time:
                        cluster, eff = make_cluster("bench", a.nproc, None, "bench", str(hw)), cal.efficiency or 1.0
                    rep = check(cfg, "cpu", cluster, calibrated=a.time, efficiency=eff)
                except ShardwiseError as e:
                    print(f"{name:<11} {text:<32} not run: {e}")
                    continue
                judged = rep.judged
                peak = [f"{r.ranks}:{100 * r.error:+.1f}%" for r in judged if r.item == "peak memory"]
                states = max(
                    (abs(r.error) for r in judged if r.section == "memory" and r.item != "peak memory"), default=0.0
                )
                comm = [r for r in judged if r.section == "comm"]
                line = (
                    f"{name:<11} {cfg.plan.short():<32} {' '.join(peak):<30} "
                    f"{100 * states:>6.2f}% {'exact' if all(r.ok for r in comm) else 'MISS':>6}"
                )
                if a.time:
                    t = next(r for r in rep.rows if r.item == "step time")
                    line += f" {t.predicted * 1e3:>6.0f} / {t.measured * 1e3:>4.0f} ms {100 * t.error:>+6.1f}%"
                    d = next(r for r in rep.ranks if str(r["rank"]) == t.ranks)["measurement"]["time"]["detail"]
                    line += f"  (steps {d['step_s_q1'] * 1e3:.0f}-{d['step_s_q3'] * 1e3:.0f})"  # the middle half
                total += 1
                passed += rep.passed
                print(line + ("" if rep.passed else "  FAILED"), flush=True)
    print(f"{passed} of {total} checks passed; load average {os.getloadavg()[0]:.1f} at the end")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
