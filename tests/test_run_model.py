"""The run tier's reference model and single-process engine: names and shapes are the spec's,
the architecture does what it says (causal, GQA, rotary, tying, recompute), initialization does
not depend on the layout, and the Engine's step is plain training."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from _models import TINY_GPT2, TINY_LLAMA

from shardwise.errors import ShardwiseError
from shardwise.run.model import INIT_STD, apply_rotary, build, initial_value, rotary
from shardwise.run.parallelize import check_supported, split_pipeline
from shardwise.spec.plan import Plan
from shardwise.spec.presets import preset

LLAMA, GPT2 = TINY_LLAMA, dataclasses.replace(TINY_GPT2, layers=2)
CPU = torch.device("cpu")


def names_shapes(model) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


# ---- names and shapes ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["gpt2-124m", "llama-2-7b", "llama-2-70b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "llama-3.2-1b"]
)
def test_full_size_presets_on_meta_match_the_spec(name):
    """At full size on the meta device (no memory): every name and shape is the spec's, in
    order, and the parameters add up to the spec's (published) count."""
    spec = preset(name)
    model = build(spec)
    assert names_shapes(model) == spec.param_shapes()
    assert sum(p.numel() for p in model.parameters()) == spec.params
    assert all(p.is_meta for p in model.parameters())


def test_llama_2_70b_count_by_hand():
    # 80 layers x (attention 8192*8192*2 + 2*8192*1024 [GQA: 8 KV heads of 128]
    #   + MLP 3*8192*28672 + norms 2*8192) + embeddings 2*32000*8192 + final norm 8192
    # = 80 * (134,217,728 + 16,777,216 + 704,643,072 + 16,384) + 524,288,000 + 8,192
    # = 80 * 855,654,400 + 524,296,192 = 68,976,648,192   (Meta's 70B)
    model = build(preset("llama-2-70b"))
    assert sum(p.numel() for p in model.parameters()) == 68_976_648_192


def test_moe_is_refused_in_one_line():
    with pytest.raises(ShardwiseError, match="mixture of experts") as e:
        build(preset("mixtral-8x7b"))
    assert "\n" not in str(e.value)


def test_scaled_down_models_run():
    spec = preset("llama-3.1-8b").scaled(layers=2, hidden=128, heads=4, kv_heads=2, vocab=256)
    model = build(spec, CPU, seed=0)
    assert names_shapes(model) == spec.param_shapes()
    logits = model(torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()


# ---- architecture -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_causal(spec):
    """Changing token t changes no logit before t."""
    model = build(spec, CPU, seed=0)
    x = torch.randint(0, spec.vocab, (1, 16))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % spec.vocab
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_grouped_query_attention_is_multi_head_with_shared_kv():
    """GQA with 2 KV heads equals multi-head attention whose 4 KV heads repeat them in order
    (query heads 0,1 read KV head 0; 2,3 read KV head 1): repeat_interleave, as Llama does."""
    gqa = LLAMA.scaled(layers=1)
    mha = gqa.scaled(kv_heads=4)
    a, b = build(gqa, CPU, seed=3), build(mha, CPU, seed=3)
    sd = a.state_dict()
    hd = gqa.head_dim
    for w in ("wk", "wv"):  # [2*hd, h] -> [4*hd, h]: each KV head's rows twice
        k = sd[f"layers.0.attention.{w}.weight"].view(2, hd, -1)
        sd[f"layers.0.attention.{w}.weight"] = k.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    b.load_state_dict(sd)
    x = torch.randint(0, gqa.vocab, (2, 12))
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)


def test_rotary_scores_depend_on_relative_position_only():
    """<R(m) q, R(n) k> = <R(m+c) q, R(n+c) k>: rotary encodes the offset m - n."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    cos, sin = rotary(40, 16, CPU, torch.float32)

    def score(m, n):
        return float(
            (apply_rotary(q, cos[m : m + 1], sin[m : m + 1]) * apply_rotary(k, cos[n : n + 1], sin[n : n + 1])).sum()
        )

    assert score(7, 3) == pytest.approx(score(30, 26), rel=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)
    # position 0 is the identity: cos 0 = 1, sin 0 = 0
    torch.testing.assert_close(apply_rotary(q, cos[:1], sin[:1]), q)


def test_tied_embeddings_are_one_parameter():
    model = build(GPT2, CPU, seed=0)
    assert model.output.weight is model.tok_embeddings.weight
    assert "output.weight" not in dict(model.named_parameters())
    untied = build(LLAMA, CPU, seed=0)
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_dropout_from_the_spec():
    spec = GPT2.scaled(dropout=0.5)
    model = build(spec, CPU, seed=0)
    x = torch.randint(0, spec.vocab, (2, 8))
    torch.manual_seed(1)
    a = model(x)
    b = model(x)
    assert not torch.allclose(a, b)  # training mode: a fresh mask each call
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


# ---- initialization -------------------------------------------------------------------------------
def test_init_is_deterministic_and_seeded():
    a, b, c = build(LLAMA, CPU, seed=5), build(LLAMA, CPU, seed=5), build(LLAMA, CPU, seed=6)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
        if p.ndim == 2:
            assert not torch.equal(p, r), n


def test_init_does_not_depend_on_the_rest_of_the_model():
    """Each parameter is drawn from (seed, its name) alone: a 2-layer model's layers are the
    4-layer model's first two, which is why every parallel layout starts from the same weights."""
    big, small = build(LLAMA, CPU, seed=5), build(LLAMA.scaled(layers=2), CPU, seed=5)
    bp = dict(big.named_parameters())
    for n, p in small.named_parameters():
        if not n.startswith(
            ("layers.0.attention.wo", "layers.0.feed_forward.w2", "layers.1.attention.wo", "layers.1.feed_forward.w2")
        ):  # their std has 1/sqrt(2L) in it
            assert torch.equal(p, bp[n]), n


def test_init_scheme():
    """GPT-2's: N(0, 0.02) weights and embeddings, residual projections N(0, 0.02/sqrt(2L)),
    zero biases, unit norm scales."""
    model = build(GPT2, CPU, seed=0)
    p = dict(model.named_parameters())
    # 2L = 4 layers' worth: 0.02 / sqrt(4) = 0.01
    p = {k: v.detach() for k, v in p.items()}
    assert float(p["layers.0.attention.wo.weight"].std()) == pytest.approx(INIT_STD / 2, rel=0.05)
    assert float(p["layers.1.feed_forward.w1.weight"].std()) == pytest.approx(INIT_STD, rel=0.05)
    assert float(p["tok_embeddings.weight"].std()) == pytest.approx(INIT_STD, rel=0.05)
    assert torch.equal(p["layers.0.attention.wq.bias"], torch.zeros(64))
    assert torch.equal(p["layers.1.ffn_norm.weight"], torch.ones(64))
    assert torch.equal(p["norm.bias"], torch.zeros(64))
    # the tied copy a last pipeline stage holds starts as the embedding
    assert torch.equal(initial_value(GPT2, model.init_name("output.weight"), (128, 64), 0), p["tok_embeddings.weight"])


def test_initial_loss_is_uniform_guess():
    """Small init -> near-uniform logits -> cross-entropy ~ ln(vocab) = ln 128 = 4.852."""
    model = build(LLAMA, CPU, seed=0)
    x = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    assert float(loss) == pytest.approx(math.log(128), abs=0.05)


# ---- recompute ----------------------------------------------------------------------------------
def _saved(block, x):
    """(number, bytes) of tensors autograd saves for backward during one forward of a block."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return saved


def _set(block, mode):
    block.recompute = mode if mode in ("full", "selective-op") else "none"
    block.attention.recompute_core = mode == "selective"


def test_full_recompute_keeps_only_the_block_input():
    block = build(LLAMA, CPU, seed=0).layers["0"]
    x = torch.randn(2, 32, 64, requires_grad=True)
    _set(block, "full")
    saved = _saved(block, x)
    assert len(saved) == 1 and saved[0] is x


def test_selective_recompute_drops_the_attention_core():
    """Selective checkpoints SDPA: its output [b, heads, s, hd] and logsumexp [b, heads, s] are
    not kept; K/V are kept at kv_heads either way (SDPA takes GQA natively on the CPU)."""
    block = build(LLAMA, CPU, seed=0).layers["0"]
    x = torch.randn(2, 32, 64, requires_grad=True)
    shapes = {}
    for mode in ("none", "selective"):
        _set(block, mode)
        shapes[mode] = [tuple(t.shape) for t in _saved(block, x)]
    lse, heads_shape, kv_shape = (2, 4, 32), (2, 4, 32, 16), (2, 2, 32, 16)
    assert lse in shapes["none"] and lse not in shapes["selective"]
    # none: q and the output at heads, k and v at kv_heads; selective: q only (the core's input)
    assert shapes["none"].count(heads_shape) == 2 and shapes["selective"].count(heads_shape) == 1
    assert shapes["none"].count(kv_shape) == 2 and shapes["selective"].count(kv_shape) == 2
    assert len(shapes["selective"]) < len(shapes["none"])


def test_recompute_reruns_what_it_dropped():
    """Forward + backward: full recompute runs every block's projections twice, selective runs
    the attention core twice and the projections once; none runs everything once."""
    model = build(LLAMA.scaled(layers=1), CPU, seed=0)
    block = model.layers["0"]
    calls = {"wq": 0, "core": 0}
    block.attention.wq.register_forward_hook(lambda *a: calls.__setitem__("wq", calls["wq"] + 1))
    core = block.attention.core

    def counted(*a):
        calls["core"] += 1
        return core(*a)

    block.attention.core = counted
    x = torch.randint(0, 128, (2, 16))
    for mode, want in (("none", (1, 1)), ("selective", (1, 2)), ("full", (2, 2))):
        calls.update(wq=0, core=0)
        _set(block, mode)
        model(x).sum().backward()
        assert (calls["wq"], calls["core"]) == want, mode


# ---- pipeline split -----------------------------------------------------------------------------
def test_pipeline_split_keeps_global_names():
    """pp=2, vpp=2: 4 stages of 1 layer; rank 0 runs stages 0 and 2, rank 1 stages 1 and 3.
    Stage 0 has the embedding, stage 3 the final norm and output; names stay global."""
    model = build(LLAMA)
    plan = Plan(pp=2, vpp=2, schedule="interleaved", dp=1, mbs=1, gbs=4, seq=32)
    r0, r1 = split_pipeline(model, plan, 0), split_pipeline(model, plan, 1)
    assert [s for s, _ in r0] == [0, 2] and [s for s, _ in r1] == [1, 3]
    names = {s: [n for n, _ in m.named_parameters()] for s, m in r0 + r1}
    assert names[0][0] == "tok_embeddings.weight" and all(n.startswith(("tok_", "layers.0.")) for n in names[0])
    assert all(n.startswith("layers.2.") for n in names[2])
    assert names[3][-2:] == ["norm.weight", "output.weight"]
    together = [ns for s in range(4) for ns in names[s]]
    assert together == [n for n, _ in LLAMA.param_shapes()]


def test_pipeline_split_tied_last_stage_keeps_a_copy():
    model = build(GPT2)
    plan = Plan(pp=2, dp=1, mbs=1, gbs=2, seq=32)
    ((_, first),) = split_pipeline(model, plan, 0)
    ((_, last),) = split_pipeline(model, plan, 1)
    assert "tok_embeddings.weight" in dict(first.named_parameters())
    assert list(dict(last.named_parameters()))[-1] == "output.weight"
    assert last.tok_embeddings is None and first.output is None


# ---- what the run tier refuses ------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,fields,match",
    [
        (LLAMA, dict(optimizer="adam8bit"), "bitsandbytes"),
        (LLAMA, dict(dp=2, tp=2, optimizer="adafactor"), "adafactor needs whole parameters"),
        (LLAMA, dict(dp=2, zero=3, optimizer="adafactor"), "adafactor needs whole parameters"),
        (LLAMA, dict(dp=2, zero=1, offload="optimizer"), "no PyTorch engine"),
        (LLAMA, dict(dp=2, zero=3, offload="params"), "CUDA"),
        (LLAMA, dict(dp=1, zero=3, offload="params"), "dp > 1"),
        (LLAMA, dict(precision="fp16-mixed"), "CUDA"),
        (GPT2, dict(dp=2, tp=2, zero=0), "ties its embeddings"),
        (GPT2, dict(dp=2, tp=2, zero=1), "ties its embeddings"),
    ],
)
def test_refusals_are_one_line(spec, fields, match):
    plan = Plan(**({"dp": 1, "mbs": 1, "seq": 32, "precision": "fp32"} | fields))
    plan = plan.resolve(spec, plan.dp * plan.tp * plan.pp)
    with pytest.raises(ShardwiseError, match=match) as e:
        check_supported(spec, plan, CPU)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fields", [dict(dp=2, tp=2, zero=2), dict(dp=2, tp=2, pp=2, zero=0), dict(dp=1, tp=2)])
def test_tied_embeddings_with_tp_are_fine_elsewhere(fields):
    """FSDP2 holds the alias; with a pipeline the two uses are on different stages."""
    plan = Plan(**fields, mbs=1, seq=32, precision="fp32")
    check_supported(GPT2, plan.resolve(GPT2, plan.dp * plan.tp * plan.pp), CPU)


# ---- the Engine, one process --------------------------------------------------------------------
def engine(spec=LLAMA, **kw):
    from shardwise.run.engine import Engine

    fields = dict(mbs=2, gbs=8, seq=32, precision="fp32") | {
        k: kw.pop(k) for k in list(kw) if k in Plan.__dataclass_fields__
    }
    return Engine(spec, Plan(**fields), device=CPU, seed=kw.pop("seed", 11), **kw)


def tokens(spec, gbs=8, seq=32, seed=0):
    return torch.randint(0, spec.vocab, (gbs, seq + 1), generator=torch.Generator().manual_seed(seed))


def test_engine_loss_and_norm_are_plain_training():
    """Step 0: the loss is the mean cross-entropy of the untrained model over all 8 x 32 tokens,
    the norm is torch's clip_grad_norm_ of the gradient of that mean."""
    eng = engine(lr=1e-3)
    x = tokens(LLAMA)
    model = build(LLAMA, CPU, seed=11)
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    stats = eng.train_step(x)
    assert stats.loss == pytest.approx(float(loss.detach()), rel=1e-6)
    assert stats.grad_norm == pytest.approx(float(norm), rel=1e-5)
    assert not stats.skipped


def test_gradient_accumulation_is_the_big_batch():
    """4 micro-batches of 2 (each loss / 4) = 1 batch of 8: same losses, same parameters (up to
    AdamW's per-element normalization of rounding noise: atol 1% of one lr-1e-3 step)."""
    a, b = engine(mbs=2, lr=1e-3), engine(mbs=8, lr=1e-3)
    assert a.plan.grad_accum == 4 and b.plan.grad_accum == 1
    for step in range(3):
        x = tokens(LLAMA, seed=step)
        sa, sb = a.train_step(x), b.train_step(x)
        assert sa.loss == pytest.approx(sb.loss, rel=1e-6)
        assert sa.grad_norm == pytest.approx(sb.grad_norm, rel=1e-5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=n)
        assert float(((p - q).norm() / q.norm()).detach()) < 1e-5, n


def test_clipping_to_the_global_norm():
    """SGD, lr 0.1, clip 1e-3: the first step (momentum buffer = gradient) moves the parameters
    by lr * clipped gradient, a vector of norm 0.1 * 1e-3 * n/(n + 1e-6) = 1e-4 (n ~ 1 >> 1e-6)."""
    eng = engine(optimizer="sgd", lr=0.1, grad_clip=1e-3)
    before = [p.detach().clone() for _, p in eng.named_parameters()]
    stats = eng.train_step(tokens(LLAMA))
    assert stats.grad_norm > 1e-2  # really clipped
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for (_, p), b in zip(eng.named_parameters(), before)))
    assert float(moved) == pytest.approx(1e-4, rel=1e-4)


def test_set_lr_zero_freezes_the_model():
    eng = engine(optimizer="sgd", lr=0.5)
    eng.set_lr(0.0)
    before = eng.state_dict_full()
    eng.train_step(tokens(LLAMA))
    after = eng.state_dict_full()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_weight_decay_on_matrices_only():
    eng = engine(weight_decay=0.1)
    decay, no_decay = eng.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(LLAMA.param_shapes())


def test_state_dict_full_is_the_spec():
    eng = engine(GPT2)
    sd = eng.state_dict_full()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == GPT2.param_shapes()


def test_engine_refuses_a_plan_for_more_processes():
    with pytest.raises(ShardwiseError, match="--nproc 2") as e:
        engine(dp=2)
    assert "\n" not in str(e.value)


def test_engine_refuses_wrong_token_shapes():
    eng = engine()
    with pytest.raises(ShardwiseError, match=r"\[8, 33\]"):
        eng.train_step(tokens(LLAMA, seq=31))
