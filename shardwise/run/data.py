"""Training data: a learnable synthetic source, a nanoGPT-style token file, a byte-level text file.

Every source gives the same global batch for a given (seed, step) whatever the world size:
row i of step s is drawn from its own random stream, seeded by (seed, s, i), and data-parallel
rank r of R builds only its rows [r*gbs/R, (r+1)*gbs/R). So a run on 4 ranks sees exactly the
tokens a single process sees, which is what the equivalence tests need, and no rank builds
rows it does not use.

Batches are int64 numpy arrays [rows, seq + 1]: inputs are [:, :-1], targets [:, 1:].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardwise.errors import ShardwiseError

# a token file larger than this is checked against the vocabulary window by window as it is
# read, not scanned whole up front (a 9B-token file would take minutes to scan)
FULL_CHECK_BYTES = 256 * 2**20


def _row_rng(seed: int, step: int, row: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, row])


def _rows(gbs: int, rank: int, ranks: int) -> range:
    if ranks < 1 or not 0 <= rank < ranks or gbs % ranks:
        raise ValueError(f"cannot split a global batch of {gbs} over rank {rank} of {ranks}")
    n = gbs // ranks
    return range(rank * n, (rank + 1) * n)


# ---- the synthetic source: a fixed random Markov chain ------------------------------------
@dataclass(frozen=True)
class MarkovChain:
    """A first-order Markov chain over `vocab` tokens with sparse rows: token v is followed by
    successors[v, j] with probability probs[v, j] (a successor may repeat; its mass adds up)."""

    successors: np.ndarray  # int64 [V, k]
    probs: np.ndarray  # float64 [V, k], rows sum to 1

    @property
    def vocab(self) -> int:
        return len(self.successors)

    @classmethod
    def random(cls, vocab: int, branch: int, seed: int) -> MarkovChain:
        """branch random permutations of the vocabulary, mixed with one Dirichlet(1) weight vector:
        token v goes to perm_j[v] with probability w_j. Each row sums to 1 and so does each column
        (a mixture of permutation matrices is doubly stochastic), so the uniform distribution is
        stationary: samples started uniformly are stationary at every position, and the entropy
        rate is the plain mean of the row entropies, whatever the chain's mixing time."""
        if vocab < 2 or branch < 2:
            raise ValueError(f"a Markov chain needs vocab >= 2 and branch >= 2, got {vocab}, {branch}")
        rng = np.random.default_rng(seed)
        succ = np.column_stack([rng.permutation(vocab) for _ in range(branch)]).astype(np.int64)
        return cls(succ, np.tile(rng.dirichlet(np.ones(branch)), (vocab, 1)))

    def row_entropies(self) -> np.ndarray:
        """H(next | current = v) in nats, per v, after merging repeated successors."""
        order = np.argsort(self.successors, axis=1, kind="stable")
        s = np.take_along_axis(self.successors, order, 1)
        p = np.take_along_axis(self.probs, order, 1).copy()
        for j in range(1, s.shape[1]):  # carry the mass of a repeat into its last copy
            same = s[:, j] == s[:, j - 1]
            p[same, j] += p[same, j - 1]
            p[same, j - 1] = 0.0
        logp = np.log(np.where(p > 0, p, 1.0))
        return -(p * logp).sum(1)

    def stationary(self, tol: float = 1e-13, max_iter: int = 100_000) -> np.ndarray:
        """pi = pi P by power iteration (converges: the chain is irreducible and aperiodic)."""
        pi = np.full(self.vocab, 1.0 / self.vocab)
        flat = self.successors.ravel()
        for _ in range(max_iter):
            nxt = np.bincount(flat, weights=(pi[:, None] * self.probs).ravel(), minlength=self.vocab)
            if np.abs(nxt - pi).sum() < tol:
                return nxt / nxt.sum()
            pi = nxt
        raise RuntimeError("the Markov chain's stationary distribution did not converge")

    def entropy_rate(self) -> float:
        """H = sum_v pi_v H(next | v), nats per token: the lowest mean cross-entropy any model can
        reach on a sample that starts from pi, since every target depends on its predecessor only."""
        return float(self.stationary() @ self.row_entropies())

    def sample(self, uniforms: np.ndarray, pi: np.ndarray) -> np.ndarray:
        """Walk the chain: uniforms [rows, T] in [0, 1) -> tokens [rows, T]. Column 0 draws the
        start from pi (so every position is stationary), column t the step from token t-1."""
        cum = np.cumsum(self.probs, axis=1)
        out = np.empty(uniforms.shape, dtype=np.int64)
        out[:, 0] = np.minimum(np.searchsorted(np.cumsum(pi), uniforms[:, 0], side="right"), self.vocab - 1)
        last = self.successors.shape[1] - 1
        for t in range(1, uniforms.shape[1]):
            cur = out[:, t - 1]
            j = np.minimum((uniforms[:, t, None] >= cum[cur]).sum(1), last)  # rounding: cum[-1] may be < 1
            out[:, t] = self.successors[cur, j]
        return out


class SyntheticSource:
    kind = "synthetic"

    def __init__(self, vocab: int, branch: int, gbs: int, seq: int, seed: int):
        self.chain = MarkovChain.random(vocab, branch, seed)
        self.pi = self.chain.stationary()
        self.floor = float(self.pi @ self.chain.row_entropies())
        self.vocab, self.gbs, self.seq, self.seed = vocab, gbs, seq, seed

    def batch(self, step: int, rank: int = 0, ranks: int = 1) -> np.ndarray:
        rows = _rows(self.gbs, rank, ranks)
        u = np.stack([_row_rng(self.seed, step, i).random(self.seq + 1) for i in rows])
        return self.chain.sample(u, self.pi)

    def describe(self) -> str:
        return (
            f"synthetic Markov chain: vocab {self.chain.vocab}, {self.chain.successors.shape[1]} successors "
            f"per token; entropy rate {self.floor:.4f} nats/token (the lowest loss reachable), "
            f"uniform guess ln(vocab) = {math.log(self.chain.vocab):.4f}"
        )


# ---- file sources -----------------------------------------------------------------------------
class FileSource:
    """Random windows of seq + 1 tokens from a flat token array on disk: uint16 (nanoGPT's
    train.bin, written with arr.tofile) or uint8 (raw bytes of a text file, vocab 256)."""

    def __init__(self, path: str, kind: str, vocab: int, gbs: int, seq: int, seed: int):
        dtype = np.uint16 if kind == "tokens" else np.uint8
        p = Path(path)
        if not p.is_file():
            raise ShardwiseError(f"data file {path!r} does not exist; check [data] path (relative to the config file)")
        size = p.stat().st_size
        if kind == "tokens" and size % 2:
            raise ShardwiseError(
                f"{path}: {size} bytes is not a whole number of uint16 tokens; give a "
                "nanoGPT-style .bin (np.uint16 array written with tofile)"
            )
        n = size // np.dtype(dtype).itemsize
        if n < seq + 1:
            raise ShardwiseError(
                f"{path}: {n} tokens, shorter than one window of seq + 1 = {seq + 1}; "
                "use a longer file or a smaller seq"
            )
        self.tokens = np.memmap(p, dtype=dtype, mode="r")
        self.path, self.kind, self.vocab = path, kind, vocab
        self.gbs, self.seq, self.seed = gbs, seq, seed
        self.checked = size <= FULL_CHECK_BYTES
        if self.checked:
            top = int(self.tokens.max())
            if top >= vocab:
                at = int(np.argmax(self.tokens >= vocab))
                self._too_big(top, at)

    def _too_big(self, token: int, at: int):
        unit = "byte" if self.kind == "text" else "token"
        raise ShardwiseError(
            f"{self.path}: {unit} {token} at position {at} is not below the model's vocab "
            f"{self.vocab}; raise [model] vocab to at least {token + 1} or use a matching file"
        )

    def batch(self, step: int, rank: int = 0, ranks: int = 1) -> np.ndarray:
        rows = _rows(self.gbs, rank, ranks)
        last_start = len(self.tokens) - self.seq - 1  # inclusive
        starts = [int(_row_rng(self.seed, step, i).integers(0, last_start + 1)) for i in rows]
        out = np.stack([np.asarray(self.tokens[s : s + self.seq + 1], dtype=np.int64) for s in starts])
        if not self.checked and out.max() >= self.vocab:
            r, c = np.argwhere(out >= self.vocab)[0]
            self._too_big(int(out[r, c]), starts[r] + int(c))
        return out

    def describe(self) -> str:
        what = "uint16 tokens" if self.kind == "tokens" else "bytes of text (vocab 256)"
        return f"{self.path}: {len(self.tokens):,} {what}, random windows of {self.seq + 1}"


def open_source(data, model, plan):
    """The source a [data] table names (DataConfig), for this ModelSpec and resolved Plan."""
    if data.source == "synthetic":
        return SyntheticSource(model.vocab, data.branch, plan.gbs, plan.seq, data.seed)
    return FileSource(data.path, data.source, model.vocab, plan.gbs, plan.seq, data.seed)
