"""`shardwise plan` end to end: exit codes 0 (plans), 1 (nothing fits: the answer says what would),
2 (a request no plan can meet, one line); the table, the JSON contract, --min-gpus, --rank."""

from __future__ import annotations

import json

from shardwise.cli import main

SMALL = ["gpt2-124m", "--gpu", "rtx-4090", "--gpus", "2", "--seq", "1024", "--gbs", "32"]


def run(capsys, *argv):
    """Exit code, stdout, stderr of `shardwise plan ARGV` (captured output is not a terminal, so
    tables get 140 columns: report.tables.make_console)."""
    try:
        rc = main(["plan", *argv])
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_table_and_reasons(capsys):
    rc, out, err = run(capsys, *SMALL, "--top", "3")
    assert rc == 0 and err == ""
    for text in (
        "gpt2-124m",
        "global batch 32 x 1,024 tokens",
        "pinned",
        "recommended",
        "train it",
        "Top 3 of",
        "tokens/s",
    ):
        assert text in out, text
    # the answer comes first; why-lines and rejections wait for their flags
    assert out.index("recommended") < out.index("train it") < out.index("Top 3 of")
    assert "rejected" not in out.split("--explain")[0] and " 1. " not in out
    rc, out, _ = run(capsys, *SMALL, "--top", "3", "--explain", "-v")
    assert rc == 0
    for text in ("why", " 1. ", " 3. ", "rejected", "searched"):
        assert text in out, text
    assert out.index("Top 3 of") < out.index("why") < out.index("rejected")


def test_json_is_ranked_estimates(capsys):
    rc, out, _ = run(capsys, *SMALL, "--top", "4", "--json")
    d = json.loads(out)
    assert rc == 0 and len(d["ranked"]) == 4
    tps = [e["time"]["tokens_per_s"] for e in d["ranked"]]
    assert tps == sorted(tps, reverse=True)
    for i, e in enumerate(d["ranked"]):
        assert e["rank"] == i + 1 and e["why"]
        assert set(e) >= {"model", "cluster", "plan", "memory", "comm", "time", "profile"}
        assert e["memory"]["total"] <= 0.9 * e["memory"]["capacity"]
        assert e["plan"]["gbs"] == 32 and e["plan"]["seq"] == 1024 and e["plan"]["world"] == 2
    assert d["held"] == {"gbs": 32, "gbs_pinned": True, "seq": 1024}
    assert d["searched"]["legal"] >= d["searched"]["estimated"] >= d["searched"]["fit"] >= 4
    assert d["closest"] is None and d["what_it_would_take"] == []


def test_nothing_fits_is_exit_1_with_what_would(capsys):
    # DDP pinned: LLaMA-2-7B's 16 bytes/param do not fit an A100-80GB; unpinning ZeRO would
    rc, out, _ = run(
        capsys,
        "llama-2-7b",
        "--gpu",
        "a100-80gb",
        "--gpus",
        "8",
        "--zero",
        "0",
        "--tp",
        "1",
        "--pp",
        "1",
        "--gbs",
        "64",
    )
    assert rc == 1
    assert "nothing fits" in out and "closest" in out and "what would make it fit" in out
    assert "unpin --zero 0" in out and "more GPUs" not in out.split("rejected")[0] or "more GPUs" in out
    rc, out, _ = run(
        capsys,
        "llama-2-7b",
        "--gpu",
        "a100-80gb",
        "--gpus",
        "8",
        "--zero",
        "0",
        "--tp",
        "1",
        "--pp",
        "1",
        "--gbs",
        "64",
        "--json",
    )
    d = json.loads(out)
    assert rc == 1 and d["ranked"] == [] and d["closest"]["memory"]["fits"] is False
    assert any(a.startswith("unpin --zero 0") for a in d["what_it_would_take"])


def test_impossible_requests_exit_2_with_one_line(capsys):
    for argv, text in (
        [("llama-2-7b", "--gpus", "8", "--tp", "3"), "tp=3 must divide the attention heads"],
        [("llama-2-7b", "--gpus", "16", "--gbs", "3", "--pp", "1"), "global batch 3 is not a multiple"],
        [
            ("llama-3.1-405b", "--gpu", "rtx-4090", "--gpus", "4", "--host-memory", "64"),
            "does not fit on 4x rtx-4090 with any plan",
        ],
        [("llama-2-7b", "--headroom", "150%"), "must be in [0, 1)"],
        [("llama-2-7b", "--rank", "cost"), "needs a token budget"],
    ):
        rc, out, err = run(capsys, *argv)
        assert rc == 2 and out == "", argv
        assert text in err and err.count("\n") == 1, err


def test_min_gpus(capsys):
    rc, out, _ = run(capsys, "gpt2-124m", "--gpu", "rtx-4090", "--seq", "1024", "--min-gpus", "--top", "1")
    assert rc == 0 and "fewest GPUs: 1 rtx-4090" in out
    rc, out, _ = run(
        capsys, "llama-2-70b", "--gpu", "a100-80gb", "--offload", "none", "--min-gpus", "--json", "--top", "1"
    )
    d = json.loads(out)
    assert rc == 0 and d["min_gpus"] == d["cluster"]["gpus"] > 16 and d["ranked"][0]["plan"]["offload"] == "none"


def test_rank_by_cost_compares_gpu_counts(capsys):
    rc, out, _ = run(
        capsys,
        "gpt2-124m",
        "--gpu",
        "rtx-4090",
        "--gpus",
        "8",
        "--seq",
        "1024",
        "--gbs",
        "64",
        "--rank",
        "cost",
        "--tokens",
        "10B",
        "--json",
        "--top",
        "5",
    )
    d = json.loads(out)
    assert rc == 0
    costs = [e["time"]["cost_usd"] for e in d["ranked"]]
    assert costs == sorted(costs)
    assert {e["cluster"]["gpus"] for e in d["ranked"]} <= {1, 2, 4, 8}
