"""Training data: the Markov chain's entropy rate (hand-worked), determinism and dp slicing
of every source, windows of the file sources, and their one-line file errors. No torch."""

import math

import numpy as np
import pytest

from shardwise.errors import ShardwiseError
from shardwise.run import data as D
from shardwise.run.config import DataConfig
from shardwise.spec.model import ModelSpec
from shardwise.spec.plan import Plan

TINY = ModelSpec(name="t", layers=2, hidden=32, heads=2, vocab=256)


def error(fn, *a) -> str:
    with pytest.raises(ShardwiseError) as e:
        fn(*a)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- the entropy rate ---------------------------------------------------------------------
def test_two_state_chain_hand_worked():
    # P = [[1-a, a], [b, 1-b]] with a = 1/2, b = 1/4.
    # stationary: pi_0 * a = pi_1 * b -> pi = (b, a) / (a + b) = (1/3, 2/3)
    # H(row 0) = ln 2 = 0.693147; H(row 1) = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.346574 + 0.215762 = 0.562335
    # entropy rate = 1/3 * 0.693147 + 2/3 * 0.562335 = 0.231049 + 0.374890 = 0.605939 nats
    chain = D.MarkovChain(np.array([[0, 1], [0, 1]]), np.array([[0.5, 0.5], [0.25, 0.75]]))
    assert chain.stationary() == pytest.approx([1 / 3, 2 / 3], abs=1e-12)
    assert chain.row_entropies() == pytest.approx([0.693147, 0.562335], abs=1e-6)
    assert chain.entropy_rate() == pytest.approx(0.605939, abs=1e-6)


def test_repeated_successors_merge_before_the_entropy():
    # row 0 lists token 1 twice (0.5 + 0.5): it is deterministic, entropy 0, not ln 2
    # row 1 -> token 0 with 0.2 + 0.3 = 0.5 and token 1 with 0.5: entropy ln 2
    chain = D.MarkovChain(np.array([[1, 1, 1], [0, 1, 0]]), np.array([[0.5, 0.5, 0.0], [0.2, 0.5, 0.3]]))
    assert chain.row_entropies() == pytest.approx([0.0, math.log(2)], abs=1e-12)


def test_synthetic_chain_is_doubly_stochastic_with_a_low_floor():
    src = D.SyntheticSource(vocab=256, branch=4, gbs=8, seq=16, seed=0)
    c = src.chain
    dense = np.zeros((256, 256))
    for v in range(256):
        np.add.at(dense[v], c.successors[v], c.probs[v])
    assert dense.sum(1) == pytest.approx(np.ones(256)) and dense.sum(0) == pytest.approx(np.ones(256))
    assert src.pi == pytest.approx(np.full(256, 1 / 256), abs=1e-15)  # uniform is stationary
    # at most 4 successors: the floor is at most ln 4 = 1.386, far below ln 256 = 5.545
    assert 0 < src.floor <= math.log(4) + 1e-12 < math.log(256) / 3
    assert src.floor == pytest.approx(c.row_entropies().mean())
    assert "entropy rate" in src.describe() and f"{src.floor:.4f}" in src.describe()


def test_sample_cross_entropy_under_the_true_chain_matches_the_floor():
    """The floor is what the best model (the chain itself) scores on the samples: the mean
    -log P(x_t | x_t-1) over 4 * 4096 tokens must be within 4 standard errors of it, and every
    step must follow an edge of the chain."""
    src = D.SyntheticSource(vocab=64, branch=3, gbs=4, seq=4096, seed=1)
    x = src.batch(0)
    dense = np.zeros((64, 64))
    for v in range(64):
        np.add.at(dense[v], src.chain.successors[v], src.chain.probs[v])
    p = dense[x[:, :-1], x[:, 1:]]
    assert (p > 0).all()
    nll = -np.log(p)
    assert abs(nll.mean() - src.floor) < 4 * nll.std() / math.sqrt(nll.size)


# ---- determinism and slicing ---------------------------------------------------------------------
def sources(tmp_path):
    tok = tmp_path / "train.bin"
    (np.arange(5000) % 1000).astype(np.uint16).tofile(tok)
    txt = tmp_path / "text.txt"
    txt.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 40)
    return [
        D.SyntheticSource(256, 4, gbs=8, seq=32, seed=3),
        D.FileSource(str(tok), "tokens", vocab=1000, gbs=8, seq=32, seed=3),
        D.FileSource(str(txt), "text", vocab=256, gbs=8, seq=32, seed=3),
    ]


def test_same_global_batch_whatever_the_world_size(tmp_path):
    for src in sources(tmp_path):
        whole = src.batch(5)
        assert whole.shape == (8, 33) and whole.dtype == np.int64
        assert whole.min() >= 0 and whole.max() < src.vocab
        for ranks in (2, 4, 8):
            parts = [src.batch(5, r, ranks) for r in range(ranks)]
            assert all(p.shape == (8 // ranks, 33) for p in parts)
            assert np.array_equal(np.concatenate(parts), whole), (src.kind, ranks)


def test_batches_depend_on_step_and_seed_only(tmp_path):
    a, b = sources(tmp_path), sources(tmp_path)
    for x, y in zip(a, b):
        assert np.array_equal(x.batch(2), y.batch(2))  # rebuilt from scratch: the same
        assert not np.array_equal(x.batch(2), x.batch(3))  # another step: other rows
    other = D.SyntheticSource(256, 4, gbs=8, seq=32, seed=4)
    assert not np.array_equal(other.batch(2), a[0].batch(2))


def test_file_windows_are_contiguous_slices(tmp_path):
    _, tok, txt = sources(tmp_path)
    rows = tok.batch(0)
    # the file is 0, 1, ..., 999, 0, 1, ...: every window steps by +1 mod 1000
    assert ((np.diff(rows, axis=1) % 1000) == 1).all()
    starts = {int(r[0]) for r in tok.batch(0)} | {int(r[0]) for r in tok.batch(1)}
    assert len(starts) > 8  # random offsets, not one fixed window
    text = (tmp_path / "text.txt").read_bytes()
    for r in txt.batch(1):
        assert bytes(r.astype(np.uint8)) in text


def test_batch_refuses_a_split_that_does_not_divide():
    with pytest.raises(ValueError):
        D.SyntheticSource(256, 4, gbs=6, seq=8, seed=0).batch(0, 0, 4)


# ---- file errors: one line each --------------------------------------------------------------
def test_missing_short_and_malformed_files(tmp_path):
    assert "does not exist" in error(D.FileSource, str(tmp_path / "nope.bin"), "tokens", 256, 4, 16, 0)
    short = tmp_path / "short.bin"
    np.arange(16, dtype=np.uint16).tofile(short)  # 16 tokens < seq + 1 = 17
    msg = error(D.FileSource, str(short), "tokens", 256, 4, 16, 0)
    assert "16 tokens" in msg and "seq + 1 = 17" in msg
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert "0 tokens" in error(D.FileSource, str(empty), "text", 256, 4, 16, 0)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    assert "not a whole number of uint16 tokens" in error(D.FileSource, str(odd), "tokens", 256, 1, 1, 0)


def test_tokens_beyond_the_vocab(tmp_path):
    f = tmp_path / "big.bin"
    t = np.zeros(100, dtype=np.uint16)
    t[37] = 300
    t.tofile(f)
    msg = error(D.FileSource, str(f), "tokens", 256, 2, 8, 0)
    assert "token 300 at position 37" in msg and "vocab 256" in msg and "at least 301" in msg
    txt = tmp_path / "t.txt"
    txt.write_bytes("naïve text".encode() * 4)  # UTF-8 bytes above 127
    assert "byte 195" in error(D.FileSource, str(txt), "text", 128, 1, 8, 0)


def test_large_files_are_checked_window_by_window(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FULL_CHECK_BYTES", 0)  # as if the file were too big to scan up front
    f = tmp_path / "big.bin"
    np.full(100, 999, dtype=np.uint16).tofile(f)
    src = D.FileSource(str(f), "tokens", 256, 2, 8, 0)  # opens: not scanned
    msg = error(src.batch, 0)
    assert "token 999" in msg and "vocab 256" in msg


def test_open_source_follows_the_data_table(tmp_path):
    plan = Plan(dp=1, mbs=2, gbs=4, seq=16)
    src = D.open_source(DataConfig(seed=7, branch=3), TINY, plan)
    assert isinstance(src, D.SyntheticSource) and src.chain.successors.shape == (256, 3)
    assert src.batch(0).shape == (4, 17)
    f = tmp_path / "a.txt"
    f.write_bytes(b"abcdefghij" * 10)
    src = D.open_source(DataConfig(source="text", path=str(f)), TINY, plan)
    assert isinstance(src, D.FileSource) and src.kind == "text" and src.batch(0).shape == (4, 17)
