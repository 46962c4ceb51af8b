"""Fit the time model's matmul efficiency on one published set, and report the errors on another.

Run: python benchmarks/fit_time_model.py [--fit korthikanti2022] [--hold narayanan2021]

The one fitted constant (shardwise/estimate/time.py): MATMUL_EFFICIENCY, the fraction of dense
peak a large matmul reaches. GEMM_FIXED_S, each matmul call's time beyond its FLOPs, is taken, not
fitted; everything else in the step (memory-bound work at HBM bandwidth, exposed communication, the
pipeline bubble) is derived. The fit minimizes the mean absolute error of the fit set's time metric
(Korthikanti et al. 2022, Table 5: iteration seconds) over a grid of 0.005; the held-out set
(Narayanan et al. 2021, Table 1: TFLOP/s per GPU) is only reported. Prints the grid's best and the
value in time.py, and both sets' mean and max absolute errors under each.
"""

from __future__ import annotations

import argparse

from shardwise import validate as v
from shardwise.estimate import time as tm

TIME_METRICS = ("step_s", "tflops_per_gpu")


def errors(name: str, eff: float) -> list[float]:
    tm.MATMUL_EFFICIENCY = eff
    return [abs(r.error_pct) for r in v.run([name], TIME_METRICS)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", default="korthikanti2022", choices=v.SETS)
    ap.add_argument("--hold", default="narayanan2021", choices=v.SETS)
    a = ap.parse_args()
    shipped = tm.MATMUL_EFFICIENCY
    best = min((x / 200 for x in range(120, 191)), key=lambda e: sum(errors(a.fit, e)))
    for label, c in (("grid best", best), ("time.py", shipped)):
        fit, hold = errors(a.fit, c), errors(a.hold, c)
        print(
            f"{label:9s}: MATMUL_EFFICIENCY {c:.3f} (GEMM_FIXED_S {tm.GEMM_FIXED_S * 1e6:.0f} us) | "
            f"fit {a.fit}: mean {sum(fit) / len(fit):.2f}%, max {max(fit):.2f}% | "
            f"held out {a.hold}: mean {sum(hold) / len(hold):.2f}%, max {max(hold):.2f}%"
        )
    tm.MATMUL_EFFICIENCY = shipped


if __name__ == "__main__":
    main()
