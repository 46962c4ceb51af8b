"""The plans the estimate cannot tell apart (search.equivalent), the default global batch both
`plan` and `estimate` use (search.space.default_gbs), and the layout helpers that keep the first
screen readable at any width (report.layout), each against hand-worked numbers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from shardwise.report.layout import Column, fitting, overhead, table, wrap
from shardwise.search.core import run_search
from shardwise.search.equivalent import EQUIVALENT_BAND, TIGHT_MEMORY, band_rows, per_token, shapes, simplicity
from shardwise.search.space import TARGET_TOKENS, Space, default_gbs
from shardwise.spec.hardware import make_cluster
from shardwise.spec.plan import SCHEDULES
from shardwise.spec.presets import preset

GIB = 2**30


def fake(rank="throughput", **cols):
    """A search result reduced to what the band and the recommendation read: the table's columns,
    its order (rows as given are best first), the GPU's memory."""
    n = len(cols["tokens_per_s"])
    one_f_one_b = SCHEDULES.index("1f1b")
    base = dict(
        offload=0, tp=1, pp=1, cp=1, ep=1, recompute=0, vpp=1, schedule=one_f_one_b, gpus=8, dp=8, mem_total=10 * GIB
    )
    arrays = {k: np.asarray(cols.get(k, [v] * n)) for k, v in base.items()}
    arrays["tokens_per_s"] = np.asarray(cols["tokens_per_s"], dtype=np.float64)
    cluster = SimpleNamespace(gpu=SimpleNamespace(memory_bytes=80 * GIB))
    return SimpleNamespace(table=SimpleNamespace(cols=arrays), order=np.arange(n), rank=rank, cluster=cluster)


def test_band_is_ten_percent_of_time_per_token():
    # best 100 tokens/s = 0.0100 s/token; the band ends at 0.0110 s/token = 90.909... tokens/s
    res = fake(tokens_per_s=[100.0, 95.0, 91.0, 90.9, 80.0])
    assert EQUIVALENT_BAND == 0.10
    assert list(band_rows(res)) == [0, 1, 2]  # 1/91 = 0.010989 in; 1/90.9 = 0.011001 out
    # by cost, GPU-seconds per token: 8/100 = 0.08 is the best; 16/190 = 0.0842 in, 16/170 = 0.0941 out
    res = fake("cost", tokens_per_s=[100.0, 190.0, 170.0], gpus=[8, 16, 16])
    assert list(band_rows(res)) == [0, 1]
    assert per_token(190.0, 16, "cost") == pytest.approx(16 / 190)
    assert per_token(190.0, 16, "time") == pytest.approx(1 / 190)


def test_recommended_is_the_simplest_in_the_band():
    res = fake(
        tokens_per_s=[100, 99, 98, 97, 96, 95],
        offload=[0, 0, 1, 0, 0, 0],
        tp=[8, 1, 1, 1, 1, 2],
        pp=[4, 1, 1, 1, 1, 1],
        recompute=[0, 2, 0, 0, 0, 0],
        mem_total=[40 * GIB, 30 * GIB, 20 * GIB, 70 * GIB, 50 * GIB, 10 * GIB],
    )
    order = list(simplicity(res, band_rows(res)))
    # row 4 and row 3: no offload, no tp/pp, no recompute; row 3 uses 70 of 80 GiB (87.5% > 80%): tight
    assert 70 / 80 > TIGHT_MEMORY > 50 / 80
    assert order[:2] == [4, 3]
    # then: recompute (row 1), one dimension (row 5: tp=2), two (row 0), offload last (row 2)
    assert order[2:] == [1, 5, 0, 2]


def test_cp_is_a_dimension_and_a_zero_bubble_schedule_counts_as_interleaving():
    """Row 0 (pp2 interleaved-zb, v = 1: ZB-H1) and row 1 (pp2 interleaved v2) rank ahead of row 2
    (pp2 1f1b) but are less simple; rows 3 and 4 split the sequence (cp2) or the experts (ep2): one
    dimension each, like row 2's pp, so among those three the ranking decides."""
    zb, inter, plain = (SCHEDULES.index(s) for s in ("interleaved-zb", "interleaved", "1f1b"))
    res = fake(
        tokens_per_s=[100, 99, 98, 97, 96, 95],
        pp=[2, 2, 2, 1, 1, 1],
        vpp=[1, 2, 1, 1, 1, 1],
        schedule=[zb, inter, plain, plain, plain, plain],
        cp=[1, 1, 1, 2, 1, 1],
        ep=[1, 1, 1, 1, 2, 1],
    )
    order = list(simplicity(res, band_rows(res)))
    assert order == [5, 2, 3, 4, 0, 1]


def test_with_equal_structure_the_ranking_decides_and_time_prefers_fewer_gpus():
    res = fake(tokens_per_s=[100, 99, 98], mem_total=[60 * GIB, 20 * GIB, 30 * GIB])
    assert list(simplicity(res, band_rows(res))) == [0, 1, 2]  # all under 80%: memory buys nothing
    res = fake("time", tokens_per_s=[100, 99, 98], gpus=[64, 32, 64])
    assert list(simplicity(res, band_rows(res)))[0] == 1
    res = fake("cost", tokens_per_s=[100, 196, 98], gpus=[32, 64, 32])
    assert list(simplicity(res, band_rows(res)))[0] == 1  # the same cost, twice the speed


def test_shapes_one_line_per_layout():
    res = fake(tokens_per_s=[5, 4, 3, 2, 1], dp=[8, 8, 4, 4, 2], tp=[1, 1, 2, 2, 4])
    assert shapes(res, np.arange(5), 10) == [0, 2, 4]
    assert shapes(res, np.array([3, 0, 1]), 2) == [3, 0]


def test_real_band_is_a_prefix_of_the_ranking():
    res = run_search(preset("llama-3.1-8b"), make_cluster("h100-80gb", 8), top=3)
    band = band_rows(res)
    assert list(band) == list(res.order[: len(band)]) and 1 <= len(band) < len(res.order)
    tps = res.table.cols["tokens_per_s"]
    assert tps[band].min() >= tps[res.order[0]] / (1 + EQUIVALENT_BAND)
    assert tps[res.order[len(band)]] < tps[res.order[0]] / (1 + EQUIVALENT_BAND)


# ---- the default global batch --------------------------------------------------------------------
def test_default_gbs_by_hand():
    assert TARGET_TOKENS == 4_194_304
    assert default_gbs(2048, [8]) == 2048  # 4,194,304 / 2048 = 2048 sequences, a multiple of 8
    assert default_gbs(1024, [8, 6]) == 4104  # 4096 in steps of lcm(8, 6) = 24: 170.7 -> 171 x 24
    assert default_gbs(8192, [4096, 16]) == 512  # 512 sequences; dp 4096 is above it, so 16 sets the step
    assert default_gbs(8192, [4096]) == 4096  # every width above the target: the smallest one
    assert default_gbs(2048, []) == 2048


def test_search_and_estimate_share_the_rule():
    m = preset("llama-3.1-8b")
    s = Space(m, 24, 8, {"seq": 2048})
    dps = sorted({24 // (tp * pp) for tp, pp in s.tp_pp if s._shape_legal(tp, pp)})
    assert s.gbs == default_gbs(2048, dps)


# ---- layout ---------------------------------------------------------------------------------------------
def test_columns_dropped_by_priority():
    cols = [Column("#", 0), Column("plan", 0, "left"), Column("aaaa", 2), Column("bb", 1), Column("cccccc", 3)]
    rows = [["1", "x" * 20, "1234", "12", "123456"]]
    # widths 1 + 20 + 4 + 2 + 6 = 33, plus two spaces between each of 5 columns: 41
    assert overhead(5) == 8 and fitting(cols, rows, 41) == [0, 1, 2, 3, 4]
    assert fitting(cols, rows, 40) == [0, 1, 2, 3]  # cccccc (priority 3) goes first
    assert fitting(cols, rows, 29) == [0, 1, 3]  # 1 + 20 + 2 + 4 spaces = 27; aaaa would need 33
    c = Console(width=29, record=True)
    c.print(table(c, cols, rows))
    text = c.export_text()
    assert "x" * 20 in text and "bb" in text and "aaaa" not in text


def test_wrap_never_splits_a_plan_name():
    name = "dp16 tp8 pp2 zero3 mbs1 ga64 interleaved/v2 sp rc-selective offload-params"
    text = f"the best plan with less tensor parallelism ({name}) is 5.2% slower; it waits on {name[:28]}"
    for width in (40, 60, 80, 100):
        lines = wrap(text, width, " 1. ")
        # the long name once, whole; the short one twice (inside the long one, and alone), whole
        assert sum(x.count(name) for x in lines) == 1
        assert sum(x.count("dp16 tp8 pp2 zero3 mbs1 ga64") for x in lines) == 2
        assert all(len(x) <= width or name in x for x in lines)  # only a name too long for the line overflows
        assert " ".join(x.strip() for x in lines) == "1. " + text  # nothing lost or added
        assert lines[0].startswith(" 1. ") and all(x.startswith("    ") for x in lines[1:])
