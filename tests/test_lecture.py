"""`shardwise lecture`: every number of the five parts is the estimate tier's (or the search's) for
the same inputs, the lecture's own numbers are reproduced where it is quoted, each figure is
written and non-trivial, the HTML page renders offline, and bad input is one line, exit 2.

The lecture is computed once per module (the search runs in parts 1 and 5); part 1 is restricted
to three of its five models to keep the file fast (gpt-3 and llama-2-70b only add search time).
"""

from __future__ import annotations

import json
import re

import pytest

from shardwise import Plan, estimate, make_cluster
from shardwise.cli import main
from shardwise.errors import ShardwiseError
from shardwise.estimate import comm as cm
from shardwise.estimate import pipeline as pl
from shardwise.estimate.memory import saved_activations
from shardwise.report import figures, html
from shardwise.report.lecture import Lecture, Settings, choose, common, part_key, render_figures, why
from shardwise.search.core import Options, fewest_gpus, run_search
from shardwise.spec.presets import load_model

PSI_7B = 6_738_415_616  # llama-7b's parameter count (derived; = the published count)
GIB = 1024**3


@pytest.fixture(scope="module")
def lec():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(why, "LECTURE_MODELS", ("gpt2-1.5b", "llama-7b", "tiny-llama"))
        lecture = Lecture()  # the lecture's own setting: llama-7b, 8x a100-80gb, ib-ndr (400 Gbit/s)
        lecture.sections()
    return lecture


@pytest.fixture(scope="module")
def rendered(lec, tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    paths, svgs = render_figures(lec.sections(), out, ("png", "svg"), dpi=30, inline=True)
    return out, paths, svgs


# ---- the parts and their keys -----------------------------------------------------------------
def test_part_keys():
    assert [part_key(k) for k in ("1", "strategies", "ZeRO", "4", "choose")] == [
        "why",
        "strategies",
        "zero",
        "comm",
        "choose",
    ]
    for bad in ("0", "6", "zer0x", ""):
        with pytest.raises(ShardwiseError, match="unknown lecture part"):
            part_key(bad)


def test_default_setting_is_the_lectures(lec):
    assert (lec.model.name, lec.cluster.gpus, lec.cluster.gpu.name, lec.cluster.network.gbits) == (
        "llama-7b",
        8,
        "a100-80gb",
        400,
    )
    assert lec.model.params == PSI_7B
    assert not Settings().customized and Settings(gpus=64).customized


# ---- part 1 -----------------------------------------------------------------------------------
def test_why_numbers_are_the_estimate(lec):
    d = lec.section("why").data["models"]
    for name, row in d.items():
        seq = common.seq_for(load_model(name), 2048)
        e = estimate(name, make_cluster("a100-80gb", 1, None, "ib-ndr"), Plan(dp=1, seq=seq), "torch")
        m = e.memory
        assert row["seq"] == seq
        assert row["states"] == m.params + m.grads + m.optimizer
        assert (row["activations"], row["other"], row["total"]) == (m.activations, m.buffers + m.overhead, m.total)
        assert row["saved_activations"] == saved_activations(e.model, e.plan)
        assert row["rule_of_thumb_bytes"] == 18 * e.model.params
    # GPT-2's learned position table holds 1024 tokens: the default 2048 is capped there
    assert d["gpt2-1.5b"]["seq"] == 1024
    # the lecture's 'GPUs needed' = ceil(18 * params / 1e9 / 80):
    # llama-7b: 18 * 6,738,415,616 = 121,291,481,088 bytes = 121.3 GB -> 2; gpt2-1.5b: 28.04 GB -> 1
    assert d["llama-7b"]["rule_of_thumb_bytes"] == 121_291_481_088
    assert (d["llama-7b"]["lecture_gpus"], d["gpt2-1.5b"]["lecture_gpus"]) == (2, 1)


def test_why_fewest_gpus_is_the_search(lec):
    """The lower bound only skips counts that cannot fit: the answer equals a search from 1."""
    d = lec.section("why").data["models"]
    for name in ("gpt2-1.5b", "llama-7b", "tiny-llama"):
        seq = d[name]["seq"]
        full = fewest_gpus(
            name, make_cluster("a100-80gb", 1, None, "ib-ndr"), {"seq": seq, "offload": "none"}, Options()
        )
        assert d[name]["fewest_gpus"] == full
        assert d[name]["lower_bound"] <= full
    # llama-7b: 16 bytes/param of torch-profile model states (fp32 weights, grads, Adam moments) = 100.4 GiB
    # at the step, over 72 GiB usable (80 GiB less 10% headroom) -> at least 2 GPUs; 2 fit
    assert d["llama-7b"]["lower_bound"] == 2 and d["llama-7b"]["fewest_gpus"] == 2
    row = next(r for r in lec.section("why").tables[0].rows if r[0] == "llama-7b")
    assert row[3] == common.fmt_gib(d["llama-7b"]["states"]) and row[-1] == "2"


def test_why_above_the_search_limit_reports_the_bound(monkeypatch):
    monkeypatch.setattr(why, "LECTURE_MODELS", ("llama-7b",))
    monkeypatch.setattr(why, "SEARCH_LIMIT", 1)
    s = Lecture().section("why")
    assert s.data["models"]["llama-7b"]["fewest_gpus"] is None
    assert s.tables[0].rows[0][-1] == "> 1"


def test_saved_activations_when_the_step_is_the_peak():
    """On one GPU the optimizer step is the peak (activations freed): memory() shows none, while
    saved_activations gives what the backward saved; it equals the activations of the same
    micro-batch on 8 GPUs, where the backward's start is the peak (at 2 sequences a micro-batch:
    at one the chunked loss keeps the backward below the optimizer step there too)."""
    one = estimate("llama-7b", make_cluster("a100-80gb", 1), Plan(dp=1, mbs=2))
    eight = estimate("llama-7b", make_cluster("a100-80gb", 8), Plan(mbs=2))
    assert one.memory.activations == 0
    assert eight.memory.activations > 0
    assert (
        saved_activations(one.model, one.plan) == eight.memory.activations == saved_activations(eight.model, eight.plan)
    )


# ---- part 2 -----------------------------------------------------------------------------------
def test_strategies_are_the_estimate(lec):
    s = lec.section("strategies")
    plans = common.strategy_plans(lec.model, lec.cluster, lec)
    # llama-7b: 32 heads, 32 layers -> tp = 8 inside the 8-GPU node, pp = 8; one global batch of 8 sequences
    assert (plans["TP"].tp, plans["PP"].pp) == (8, 8)
    assert {p.gbs for p in plans.values()} == {8}
    for name, plan in plans.items():
        e = estimate(lec.model, lec.cluster, plan, "torch")
        d = s.data[name]
        assert (d["memory_total"], d["wire_bytes"], d["tokens_per_s"]) == (
            e.memory.total,
            e.comm_wire_bytes,
            e.time.tokens_per_s,
        )
    names = [r[0] for r in s.tables[0].rows]
    assert names == list(plans)
    assert [r[0] for r in s.tables[1].rows] == list(plans) + ["CP"]  # context parallel: described, not estimated


def test_pipeline_schedules_from_the_schedule_model(lec):
    d = lec.section("strategies").data["schedules"]
    # p = 4 stages, m = 8 micro-batches: (p-1)/(m+p-1) = 3/11 for GPipe and 1F1B; v = 2: 3/(2*8+3) = 3/19
    assert d["gpipe"]["bubble"] == pytest.approx(3 / 11) == d["1f1b"]["bubble"]
    assert d["interleaved"]["bubble"] == pytest.approx(3 / 19)
    # in flight on GPU 0: GPipe all m = 8; 1F1B p = 4; interleaved p + (p-1)/v = 5.5
    assert (d["gpipe"]["inflight"], d["1f1b"]["inflight"], d["interleaved"]["inflight"]) == (8, 4, 5.5)
    for sched in ("gpipe", "1f1b", "interleaved"):  # the chart's idle time is the formula's bubble
        assert d[sched]["idle"] == pytest.approx(d[sched]["bubble"])
    # makespan, in forwards of one GPU's layers: (m + p - 1) * (F + B) = 11 * 3 = 33 for GPipe
    assert d["gpipe"]["makespan"] == 33 == max(s.end for s in pl.timeline(4, 8, 1, "gpipe"))


# ---- part 3 -----------------------------------------------------------------------------------
def test_zero_is_the_estimate_and_the_papers_formulas(lec):
    d = lec.section("zero").data
    for prof in ("zero-paper", "torch"):
        for z, stage in enumerate(("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")):
            m = estimate(lec.model, lec.cluster, Plan(zero=z), prof).memory
            row = d[prof][stage]
            assert (row["params"], row["grads"], row["optimizer"], row["activations"], row["total"]) == (
                m.params,
                m.grads,
                m.optimizer,
                m.activations,
                m.total,
            )
    # the ZeRO paper / the lecture, Psi = 6,738,415,616, N = 8 (Psi/8 = 842,301,952 exactly):
    # DDP 16 Psi; ZeRO-1 4 Psi + 12 Psi/8 = 5.5 Psi; ZeRO-2 2 Psi + 14 Psi/8 = 3.75 Psi; ZeRO-3 16 Psi/8 = 2 Psi
    paper = {s: d["zero-paper"][s]["states"] for s in ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")}
    assert paper == {
        "DDP": 107_814_649_856,
        "ZeRO-1": 37_061_285_888,
        "ZeRO-2": 25_269_058_560,
        "ZeRO-3": 13_476_831_232,
    }
    takeaways = [n.text for n in lec.section("zero").notes if n.kind == "takeaway"]
    assert any("8.0x" in t and "(zero-paper profile)" in t for t in takeaways)
    t = d["torch"]
    assert any(
        common.fmt_gib(t["DDP"]["states"]) in x and common.fmt_gib(t["ZeRO-3"]["states"]) in x for x in takeaways
    )


def test_zero_for_any_model_and_gpu_count():
    lec = Lecture(Settings(model="llama-2-70b", gpus=64, gpu="h100-80gb"))
    d = lec.section("zero").data
    m = estimate("llama-2-70b", make_cluster("h100-80gb", 64, None, "ib-ndr"), Plan(zero=3), "torch").memory
    assert d["torch"]["ZeRO-3"]["total"] == m.total
    assert "llama-2-70b on 64 GPUs" in lec.section("zero").tables[0].title


# ---- part 4 -----------------------------------------------------------------------------------
def test_comm_lecture_paper_and_torch_volumes(lec):
    d = lec.section("comm").data
    psi = PSI_7B
    # the lecture: DDP and ZeRO-1 2 * 2 * Psi bytes, ZeRO-2 2 * Psi, ZeRO-3 2 * Psi + 2 * 2 * Psi
    assert [d[s]["lecture_bytes"] for s in ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")] == [
        4 * psi,
        4 * psi,
        2 * psi,
        6 * psi,
    ]
    # its time: 4 Psi bytes * 8 bits / 400 Gbit/s = 0.539 s for DDP
    assert d["DDP"]["lecture_s"] == pytest.approx(4 * psi * 8 / 400e9)
    # the ZeRO paper, ring, N = 8: all-reduce of 2 Psi bytes sends 2 * 7/8 * 2 Psi = 3.5 Psi per GPU;
    # ZeRO-1/2 reduce-scatter + all-gather the same; ZeRO-3 1.5x = 5.25 Psi
    assert [d[s]["paper_bytes"] for s in ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")] == [int(3.5 * psi)] * 3 + [
        int(5.25 * psi)
    ]
    for name, z in (("DDP", 0), ("ZeRO-1", 1), ("ZeRO-2", 2), ("ZeRO-3", 3)):
        assert d[name]["lecture_bytes"] == cm.lecture_comm_bytes(psi, z)
        e = estimate(lec.model, lec.cluster, Plan(dp=8, zero=z, gbs=8), "torch")
        assert d[name]["torch_bytes"] == sum(c.wire_bytes for c in e.comm if c.group == "dp")
        assert d[name]["torch_s"] == pytest.approx(sum(c.seconds for c in e.comm if c.group == "dp"))
    notes = " ".join(n.text + n.source for n in lec.section("comm").notes)
    assert "2Psi" in notes and "Rajbhandari et al. 2020" in notes and "sec. 7" in notes
    assert "2(N-1)/N" in notes and "1.750" in notes  # 2 * 7/8
    assert "50 GB/s" in notes  # 400 Gbit/s / 8


# ---- part 5 -----------------------------------------------------------------------------------
def test_lecture_recommendation_quoted():
    # gpt2-1.5b: 18 * 1,557,611,200 = 28.04 GB > 24 but <= 36 -> 'ZeRO-1 or ZeRO-2'
    assert choose.lecture_recommendation(18 * 1_557_611_200, 24, 4)[1] == (1, 2)
    # llama-7b: 121.3 GB > 80 * 1.5 = 120 -> ZeRO-3 (<= 8 * 80)
    assert choose.lecture_recommendation(18 * PSI_7B, 80, 8)[1] == (3,)
    # llama-2-70b: 18 * 68,976,648,192 = 1,241.6 GB > 640 -> at least ceil(1241.6 / 80) = 16 GPUs
    words, stages = choose.lecture_recommendation(18 * 68_976_648_192, 80, 8)
    assert stages == () and "at least 16 GPUs" in words
    assert choose.lecture_recommendation(10e9, 24, 1)[1] == (0,)


def test_choose_is_the_search(lec):
    s = lec.section("choose")
    scen = s.data["scenarios"]
    assert [(d["model"], d["gpu"], d["gpus"]) for d in scen] == list(choose.SCENARIOS)
    for d in scen:
        cluster = make_cluster(d["gpu"], d["gpus"], None, "ib-ndr")
        seq = 1024 if d["model"] == "gpt2-1.5b" else 2048
        try:
            res = run_search(d["model"], cluster, seq=seq, top=1)
        except ShardwiseError as e:  # no plan fits whatever the search chooses: the lecture says so
            assert not d["fits"] and d["fewest_gpus"] > d["gpus"], str(e)
            continue
        assert d["fits"] == res.fits
        if res.fits:
            assert d["plan"] == res.ranked[0].plan.short()
            assert d["tokens_per_s_value"] == res.ranked[0].time.tokens_per_s
    assert [r[0] for r in s.tables[0].rows] == [d["title"] for d in scen]


def test_takeaways_are_generated_from_the_parts(lec):
    text = " ".join(n.text for n in lec.section("choose").notes if n.kind == "takeaway")
    z = lec.section("zero").data["torch"]
    c = lec.section("comm").data
    assert common.fmt_gib(z["DDP"]["states"]) in text and common.fmt_gib(z["ZeRO-3"]["states"]) in text
    assert f"{z['DDP']['states'] / z['ZeRO-3']['states']:.1f}x" in text
    assert common.fmt_gb(c["ZeRO-3"]["paper_bytes"]) in text and "1.50x" in text
    for d in lec.section("choose").data["scenarios"]:
        assert d["title"] in text


# ---- figures and the HTML page ------------------------------------------------------------------
def test_every_figure_is_written_and_non_trivial(lec, rendered):
    out, paths, svgs = rendered
    from PIL import Image

    stems = [f.stem for s in lec.sections() for f in s.figures]
    assert len(stems) == 6 and set(paths) == set(stems)
    for stem in stems:
        png, svg = paths[stem]
        assert png.suffix == ".png" and svg.suffix == ".svg"
        w, h = Image.open(png).size
        assert w >= 300 and h >= 150, (stem, w, h)  # >= 10 x 5 inches at 30 dpi
        assert png.stat().st_size > 5_000
        text = svg.read_text()
        assert text.count("<path") + text.count("<use") > 20, stem  # drawn marks, not an empty canvas
        assert stem in svgs


def test_html_page_is_self_contained(lec, rendered):
    _, _, svgs = rendered
    sections = lec.sections()
    page = html.page(sections, svgs, "Distributed training, computed", "sub", "footer")
    # nothing fetched from elsewhere: no scripts, stylesheets, images or fonts by URL
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
    assert not re.search(r"<(?:script|link|img|iframe)\b", page)
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", page)
    # every figure inline, every table present
    stems = [f.stem for s in sections for f in s.figures]
    assert page.count("<figure") == len(stems) and page.count("<svg") == len(stems)
    for s in sections:
        for t in s.tables:
            assert f"<h3>{html.escape(t.title)}</h3>" in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # the SVGs' clip paths and glyphs do not collide


def test_inline_svg_prefixes_ids():
    svg = (
        '<?xml version="1.0"?>\n<!DOCTYPE svg>\n<svg width="10pt" height="5pt" viewBox="0 0 10 5">'
        '<metadata>x</metadata><defs><clipPath id="c1"/></defs><g clip-path="url(#c1)"><use xlink:href="#g"/>'
        "</g></svg>"
    )
    out = figures.inline_svg(svg, "p1f0")
    assert out.startswith("<svg") and "<metadata>" not in out
    assert 'id="p1f0-c1"' in out and "url(#p1f0-c1)" in out and 'xlink:href="#p1f0-g"' in out
    assert 'width="100%"' in out and 'height="5pt"' not in out


# ---- the command line ------------------------------------------------------------------------------
def test_cli_part_figures_and_html(tmp_path, capsys):
    out, page = tmp_path / "figs", tmp_path / "report.html"
    rc = main(
        [
            "lecture",
            "--part",
            "zero",
            "--model",
            "llama-2-7b",
            "--gpus",
            "16",
            "--out",
            str(out),
            "--html",
            str(page),
            "--dpi",
            "30",
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["3-zero-memory.png", "3-zero-memory.svg"]
    text = page.read_text()
    assert text.count("<svg") == 1 and "Part 3: ZeRO" in text and "llama-2-7b on 16 GPUs" in text
    assert "Part 3: ZeRO" in capsys.readouterr().out


def test_cli_json_no_figures(tmp_path, capsys):
    rc = main(["lecture", "--part", "3", "--no-figures", "--json", "--out", str(tmp_path / "x")])
    assert rc == 0 and not (tmp_path / "x").exists()
    d = json.loads(capsys.readouterr().out)
    (part,) = d["parts"]
    assert part["key"] == "zero" and part["data"]["zero-paper"]["DDP"]["states"] == 16 * PSI_7B


def test_cli_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = main(["lecture", "--part", "zero", "--out", str(blocker / "figs"), "--dpi", "30"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--out: cannot write in" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--part", "nine"], "unknown lecture part"),
        (["--model", "gpt-5-secret"], "unknown model"),
        (["--gpu", "a100-90gb"], "unknown GPU"),
        (["--network", "carrier-pigeon"], "unknown network"),
        (["--gpus", "0"], "--gpus"),
        (["--seq", "0"], "--seq"),
        (["--dpi", "5"], "--dpi"),
        (["--formats", "gif"], "figure format"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path):
    rc = main(["lecture", "--out", str(tmp_path / "f"), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "f").exists()
