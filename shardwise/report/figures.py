"""The lecture's charts (matplotlib, Agg backend), one style and one palette for all of them.

Every function takes numbers already computed by the library and returns a matplotlib Figure;
nothing here computes a memory, a volume or a time. matplotlib is imported lazily, so the rest
of shardwise runs where it is not installed (`pip install -e '.[plot]'`).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from shardwise.errors import ShardwiseError

# Okabe-Ito: distinguishable with the common colour-vision deficiencies, and in grayscale print.
BLUE, ORANGE, GREEN, PINK, SKY, VERMILION, YELLOW, GRAY = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#8C8C8C",
)
INK, MUTED, LIGHT = "#222222", "#666666", "#D9D9D9"
LAYER = "#5A6B8C"  # a transformer layer (all of its states) in the diagrams

# one colour per meaning, everywhere
MEMORY_COLORS = {"params": BLUE, "grads": GREEN, "optimizer": ORANGE, "activations": PINK, "other": GRAY}
MEMORY_LABELS = {
    "params": "parameters",
    "grads": "gradients",
    "optimizer": "optimizer states",
    "activations": "activations",
    "other": "buffers + overhead",
}
STRATEGY_COLORS = {"DDP": BLUE, "ZeRO-1": SKY, "ZeRO-2": GREEN, "ZeRO-3": ORANGE, "TP": PINK, "PP": VERMILION}
LECTURE = dict(facecolor="#C8C8C8", hatch="///", edgecolor="#7A7A7A", linewidth=0.6)  # the lecture's numbers
CAPACITY_COLORS = (GREEN, ORANGE, VERMILION, PINK, BLUE)

FORMATS = ("png", "svg")
_STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9.5,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": MUTED,
    "axes.labelcolor": INK,
    "xtick.color": INK,
    "ytick.color": INK,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 8.5,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "svg.hashsalt": "shardwise",
    "svg.fonttype": "none",  # text stays text: small files, selectable in the HTML page
}


def _plt():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ShardwiseError("figures need matplotlib: pip install -e '.[plot]' (or use --no-figures)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_LINE_IN, _LEGEND_IN = 0.15, 0.34  # inches per caption line; kept free for the legend row
_CHARS_PER_IN = 15.5  # caption characters per inch of width at 8 pt


def new_figure(
    width: float, height: float, title: str, caption: str, nrows: int = 1, ncols: int = 1, legend: bool = False, **kw
):
    """A figure with a title, a caption (wrapped to the width) at the bottom and, with legend=True,
    a legend row above the caption (see bottom_legend). Call inside a @styled function."""
    import textwrap

    lines = textwrap.wrap(caption, int(width * _CHARS_PER_IN)) or [""]
    caption_in = 0.12 + _LINE_IN * len(lines)
    fig, axes = _plt().subplots(nrows, ncols, figsize=(width, height + caption_in), **kw)
    height += caption_in
    bottom = (caption_in + (_LEGEND_IN if legend else 0)) / height
    fig.set_layout_engine("constrained", rect=(0, bottom, 1, 1 - bottom), h_pad=0.06, w_pad=0.06)
    fig.suptitle(title, fontsize=12.5, fontweight="bold", color=INK)
    fig.text(
        0.01,
        0.06 / height,
        "\n".join(lines),
        fontsize=8,
        color=MUTED,
        ha="left",
        va="bottom",
        style="italic",
        linespacing=1.3,
    )
    fig._caption_in = caption_in  # for bottom_legend
    return fig, axes


def bottom_legend(fig, handles, ncols: int) -> None:
    """The legend row between the axes and the caption (space kept by new_figure(legend=True))."""
    h = fig.get_figheight()
    fig.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, (fig._caption_in + 0.02) / h),
        ncols=ncols,
        borderaxespad=0,
    )


def styled(fn):
    """Run a drawing function under the house style (tick labels, grids, fonts)."""

    def wrapper(*a, **kw):
        plt = _plt()
        with plt.rc_context(_STYLE):
            return fn(*a, **kw)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def save(fig, out_dir: Path, stem: str, formats=FORMATS, dpi: int = 110) -> list[Path]:
    """Write the figure as stem.png / stem.svg; return the paths. Closes the figure."""
    plt = _plt()
    paths = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for fmt in formats:
            p = out_dir / f"{stem}.{fmt}"
            meta = {"Date": None} if fmt == "svg" else {"Software": None}  # reproducible files
            with plt.rc_context(_STYLE):
                fig.savefig(p, format=fmt, dpi=dpi, metadata=meta)
            fig.set_layout_engine("none")  # laid out once: the next format reuses the positions
            paths.append(p)
    except OSError as e:
        raise ShardwiseError(f"cannot write figures to {out_dir}: {e.strerror or e}; choose another --out") from None
    finally:
        plt.close(fig)
    return paths


def close(fig) -> None:
    _plt().close(fig)


def svg_text(fig, prefix: str) -> str:
    """The figure as an <svg> element for inline HTML, ids prefixed so several can share a page."""
    buf = io.StringIO()
    with _plt().rc_context(_STYLE):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return inline_svg(buf.getvalue(), prefix)


def inline_svg(svg: str, prefix: str) -> str:
    svg = svg[svg.index("<svg") :]  # drop the XML declaration and DOCTYPE
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", svg)
    svg = re.sub(r'(xlink:href|href)="#([^"]+)"', rf'\1="#{prefix}-\2"', svg)
    # scale with the page: keep the viewBox, drop the fixed size
    svg = re.sub(r'(<svg[^>]*?)\swidth="[^"]+"\sheight="[^"]+"', r'\1 width="100%"', svg, count=1)
    return svg


def gib_label(v: float) -> str:
    if v >= 1000:
        return f"{v / 1024:,.1f} TiB"
    if v >= 100:
        return f"{v:,.0f} GiB"
    if v >= 10:
        return f"{v:,.1f} GiB"
    return f"{v:,.2f} GiB"


# ---- part 2: the parallelism diagrams ---------------------------------------------------------
_GPU_W, _GPU_STEP, _GPU_X0 = 2.1, 2.45, 0.35


def _box(ax, x, y, w, h, fc, ec=INK, lw=0.8, alpha=1.0, **kw):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.12", fc=fc, ec=ec, lw=lw, alpha=alpha, **kw)
    )


def _arrow(ax, xy_from, xy_to, color=MUTED, style="-|>", lw=1.3, **kw):
    ax.annotate(
        "", xy=xy_to, xytext=xy_from, arrowprops=dict(arrowstyle=style, color=color, lw=lw, shrinkA=1, shrinkB=1, **kw)
    )


def _gpu_states(ax, x, y, slices, n):
    """Three bars (params, grads, optimizer) inside a GPU box; `slices` = None (whole) or shard index."""
    for j, key in enumerate(("params", "grads", "optimizer")):
        by = y + 0.22 + j * 0.42
        ax.add_patch(_rect(x + 0.15, by, _GPU_W - 0.3, 0.3, fc="white", ec=LIGHT))
        if slices is None:
            ax.add_patch(_rect(x + 0.15, by, _GPU_W - 0.3, 0.3, fc=MEMORY_COLORS[key], ec="none"))
        else:
            w = (_GPU_W - 0.3) / n
            ax.add_patch(_rect(x + 0.15 + slices * w, by, w, 0.3, fc=MEMORY_COLORS[key], ec="none"))


def _rect(x, y, w, h, **kw):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, **kw)


def _state_legend(ax, y):
    for j, key in enumerate(("params", "grads", "optimizer")):
        x = 0.4 + j * 3.2
        ax.add_patch(_rect(x, y, 0.35, 0.22, fc=MEMORY_COLORS[key], ec="none"))
        ax.text(x + 0.5, y + 0.11, MEMORY_LABELS[key], va="center", fontsize=8, color=INK)


def _panel(ax, title, subtitle):
    ax.set_xlim(0, 10.2)
    ax.set_ylim(0.9, 7.6)
    ax.axis("off")
    ax.set_title(title, loc="left", fontsize=11)
    ax.text(0.0, 1.0, subtitle, transform=ax.transAxes, fontsize=8.5, color=MUTED, va="top")


@styled
def parallelism_diagrams(n: int, layers: int, model_name: str, caption: str):
    """Four panels: data parallel, fully sharded data parallel, pipeline (model) parallel, tensor parallel."""
    fig, axes = new_figure(12.5, 8.6, "How each strategy splits the work (drawn for 4 GPUs)", caption, 2, 2)
    xs = [_GPU_X0 + i * _GPU_STEP for i in range(n)]

    # data parallel: whole model everywhere, batch split, gradients all-reduced
    ax = axes[0][0]
    _panel(ax, "Data parallel (DDP)", "every GPU holds the whole model and trains on its own slice of the batch")
    for i, x in enumerate(xs):
        ax.add_patch(_rect(x + 0.25, 6.35, _GPU_W - 0.5, 0.45, fc=SKY, ec=INK, lw=0.6))
        ax.text(x + _GPU_W / 2, 6.575, f"batch {i + 1}/{n}", ha="center", va="center", fontsize=8.5)
        _box(ax, x, 3.1, _GPU_W, 2.6, fc="#F4F6FA")
        ax.text(x + _GPU_W / 2, 5.35, f"GPU {i}", ha="center", fontsize=9, fontweight="bold")
        _gpu_states(ax, x, 3.35, None, n)
        ax.text(x + _GPU_W / 2, 3.2, "whole model", ha="center", fontsize=7.5, color=MUTED)
        _arrow(ax, (x + _GPU_W / 2, 6.33), (x + _GPU_W / 2, 5.75))
    _ring(ax, xs, 2.45, "all-reduce of the gradients, bucket by bucket during backward")
    _state_legend(ax, 1.0)

    # fully sharded: each GPU keeps 1/N of every state, gathers weights just in time
    ax = axes[0][1]
    _panel(
        ax,
        "Fully sharded data parallel (ZeRO-3 / FSDP)",
        "each GPU keeps 1/N of parameters, gradients and optimizer states",
    )
    for i, x in enumerate(xs):
        ax.add_patch(_rect(x + 0.25, 6.35, _GPU_W - 0.5, 0.45, fc=SKY, ec=INK, lw=0.6))
        ax.text(x + _GPU_W / 2, 6.575, f"batch {i + 1}/{n}", ha="center", va="center", fontsize=8.5)
        _box(ax, x, 3.1, _GPU_W, 2.6, fc="#F4F6FA")
        ax.text(x + _GPU_W / 2, 5.35, f"GPU {i}", ha="center", fontsize=9, fontweight="bold")
        _gpu_states(ax, x, 3.35, i, n)
        ax.text(x + _GPU_W / 2, 3.2, f"shard {i + 1} of {n}", ha="center", fontsize=7.5, color=MUTED)
        _arrow(ax, (x + _GPU_W / 2, 6.33), (x + _GPU_W / 2, 5.75))
    _ring(ax, xs, 2.45, "all-gather weights per layer (fwd, bwd); reduce-scatter gradients")
    _state_legend(ax, 1.0)

    # pipeline: consecutive layers per GPU, activations forward, their gradients backward
    ax = axes[1][0]
    _panel(
        ax,
        "Pipeline (model) parallel",
        f"{model_name}'s {layers} layers cut into {n} stages, micro-batches flow through",
    )
    for i, x in enumerate(xs):
        _box(ax, x, 3.1, _GPU_W, 2.6, fc="#FBF3EE")
        ax.text(x + _GPU_W / 2, 5.35, f"GPU {i}", ha="center", fontsize=9, fontweight="bold")
        lo, hi = i * layers // n + 1, (i + 1) * layers // n  # as even as the layer count allows
        for k in range(4):  # a stack of layer blocks
            ax.add_patch(_rect(x + 0.3, 3.45 + k * 0.42, _GPU_W - 0.6, 0.3, fc=LAYER, ec="none"))
        span = "no layers" if hi < lo else (f"layer {lo}" if lo == hi else f"layers {lo}-{hi}")
        ax.text(x + _GPU_W / 2, 3.2, span, ha="center", fontsize=7.5, color=MUTED)
        if i < n - 1:
            _arrow(ax, (x + _GPU_W + 0.02, 4.9), (xs[i + 1] - 0.02, 4.9), color=BLUE, lw=1.6)
            _arrow(ax, (xs[i + 1] - 0.02, 3.9), (x + _GPU_W + 0.02, 3.9), color=VERMILION, lw=1.6)
    ax.add_patch(_rect(xs[0] + 0.25, 6.35, _GPU_W - 0.5, 0.45, fc=SKY, ec=INK, lw=0.6))
    ax.text(xs[0] + _GPU_W / 2, 6.575, "micro-batches", ha="center", va="center", fontsize=8)
    _arrow(ax, (xs[0] + _GPU_W / 2, 6.33), (xs[0] + _GPU_W / 2, 5.75))
    ax.text(
        5.1,
        2.45,
        "send activations forward, their gradients back: point-to-point, one boundary each",
        ha="center",
        fontsize=8.5,
        color=INK,
    )
    for j, (c, t) in enumerate(((BLUE, "activations (forward)"), (VERMILION, "activation gradients (backward)"))):
        _arrow(ax, (0.4 + j * 4.6, 1.11), (1.1 + j * 4.6, 1.11), color=c, lw=1.6)
        ax.text(1.25 + j * 4.6, 1.11, t, va="center", fontsize=8, color=INK)

    # tensor parallel: every layer's matrices split by columns / rows
    ax = axes[1][1]
    _panel(ax, "Tensor parallel (TP)", "every layer's weight matrices split across GPUs; all see the same tokens")
    for i, x in enumerate(xs):
        ax.add_patch(_rect(x + 0.25, 6.35, _GPU_W - 0.5, 0.45, fc=SKY, ec=INK, lw=0.6))
        ax.text(x + _GPU_W / 2, 6.575, "same batch", ha="center", va="center", fontsize=8.5)
        _box(ax, x, 3.1, _GPU_W, 2.6, fc="#F7F0F5")
        ax.text(x + _GPU_W / 2, 5.35, f"GPU {i}", ha="center", fontsize=9, fontweight="bold")
        mx, my, mw, mh = x + 0.35, 3.45, _GPU_W - 0.7, 1.6  # one weight matrix, this GPU's columns filled
        ax.add_patch(_rect(mx, my, mw, mh, fc="white", ec=LIGHT))
        ax.add_patch(_rect(mx + i * mw / n, my, mw / n, mh, fc=PINK, ec="none"))
        ax.text(x + _GPU_W / 2, 3.2, f"W columns {i + 1}/{n}", ha="center", fontsize=7.5, color=MUTED)
        _arrow(ax, (x + _GPU_W / 2, 6.33), (x + _GPU_W / 2, 5.75))
    _ring(ax, xs, 2.45, "all-reduce of activations inside every layer (2 forward, 2 backward)")
    return fig


def _ring(ax, xs, y, label):
    """Links between neighbouring GPUs, closed by a return path underneath: a ring collective."""
    cs = [x + _GPU_W / 2 for x in xs]
    top, low = y + 0.4, y
    for c in cs:
        ax.plot([c, c], [3.1, top], color=INK, lw=0.8)
    for a, b in zip(cs[:-1], cs[1:]):
        _arrow(ax, (a, top), (b, top), color=INK, style="-|>", lw=1.1)
    ax.plot([cs[-1], cs[-1], cs[0]], [top, low, low], color=INK, lw=1.1)
    _arrow(ax, (cs[0], low), (cs[0], top), color=INK, style="-|>", lw=1.1)
    ax.text((cs[0] + cs[-1]) / 2, low - 0.38, label, ha="center", va="center", fontsize=8.5, color=INK)


def _bar_labels(ax, bars, texts, log=False, fontsize=8, color=INK, pad=3):
    for b, t in zip(bars, texts):
        ax.annotate(
            t,
            (b.get_x() + b.get_width() / 2, b.get_y() + b.get_height()),
            xytext=(0, pad),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=fontsize,
            color=color,
        )


def _capacity_lines(ax, capacities, x_right):
    """Dashed horizontal lines, labelled at the right end (no legend to look up)."""
    for (label, v), c in zip(capacities, CAPACITY_COLORS):
        ax.axhline(v, color=c, ls="--", lw=1.3, zorder=1)
        ax.text(
            x_right, v, f" {label}", color=c, va="center", ha="left", fontsize=8.5, fontweight="bold", clip_on=False
        )


# ---- part 1 -----------------------------------------------------------------------------------
@styled
def memory_vs_capacity(names, rule_gib, states_gib, act_gib, other_gib, capacities, title, caption):
    """Per model: the lecture's rule of thumb beside the library's estimate (model states,
    activations, buffers + overhead, stacked), log scale, with GPU capacities as lines."""
    import numpy as np

    fig, ax = new_figure(11.5, 5.8, title, caption)
    x = np.arange(len(names))
    w = 0.36
    rb = ax.bar(x - w / 2, rule_gib, w, label="lecture: 18 bytes/param", **LECTURE, zorder=2)
    bottom = np.zeros(len(names))
    for vals, key, label in (
        (states_gib, "params", "model states"),
        (act_gib, "activations", "activations at the peak"),
        (other_gib, "other", "buffers + overhead"),
    ):
        if any(vals):  # an item that is zero at every peak gets no legend entry
            ax.bar(x + w / 2, vals, w, bottom=bottom, color=MEMORY_COLORS[key], label=f"shardwise: {label}", zorder=2)
            bottom = bottom + np.asarray(vals)
    ax.set_yscale("log")
    ax.set_xticks(x, names)
    ax.set_ylabel("memory to train on one device (GiB, log scale)")
    top = max(max(rule_gib), bottom.max())
    low = min(min(rule_gib), min(states_gib), min(c for _, c in capacities)) / 3
    ax.set_ylim(low, top * 6)
    _bar_labels(ax, rb, [gib_label(v) for v in rule_gib], color=MUTED)
    for xi, t in zip(x, bottom):
        ax.annotate(
            gib_label(t),
            (xi + w / 2, t),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            color=INK,
            fontweight="bold",
        )
    _capacity_lines(ax, capacities, len(names) - 0.5)
    ax.set_xlim(-0.6, len(names) - 0.5)
    ax.legend(loc="upper left", ncols=2)
    return fig


# ---- part 3 -----------------------------------------------------------------------------------
@styled
def zero_breakdown(stages, paper, torch, capacity_gib, capacity_label, title, caption):
    """Four panels, one per ZeRO stage; in each, per item (parameters, gradients, optimizer states,
    activations) the zero-paper accounting (hatched) beside the torch profile (solid).
    `paper[stage]` / `torch[stage]`: {"params", "grads", "optimizer", "activations"} in GiB."""
    import numpy as np

    keys = ("params", "grads", "optimizer", "activations")
    fig, axes = new_figure(13, 5.4, title, caption, 1, len(stages), legend=True, sharey=True)
    peak = max(max(d[k] for k in keys) for prof in (paper, torch) for d in prof.values())
    x = np.arange(len(keys))
    w = 0.38
    for ax, st in zip(axes, stages):
        pb = ax.bar(x - w / 2, [paper[st][k] for k in keys], w, **LECTURE, zorder=2)
        tb = ax.bar(x + w / 2, [torch[st][k] for k in keys], w, color=[MEMORY_COLORS[k] for k in keys], zorder=2)
        _bar_labels(ax, pb, [_short_gib(paper[st][k]) for k in keys], fontsize=7, color=MUTED, pad=1)
        _bar_labels(ax, tb, [_short_gib(torch[st][k]) for k in keys], fontsize=7, pad=1)
        ax.set_xticks(x, ["params", "grads", "optimizer", "activ."], fontsize=8.5)
        tp = sum(paper[st][k] for k in keys[:3])
        tt = sum(torch[st][k] for k in keys[:3])
        ax.set_title(f"{st}\nmodel states: {_short_gib(tp)} / {_short_gib(tt)} GiB", fontsize=10)
        ax.axhline(capacity_gib, color=VERMILION, ls="--", lw=1.2, zorder=1)
        ax.axvline(2.5, color=LIGHT, lw=0.8, zorder=0)  # activations are not sharded by ZeRO
    axes[0].set_ylabel("per GPU (GiB)")
    axes[0].set_ylim(0, max(peak, capacity_gib) * 1.15)
    axes[-1].text(
        3.6,
        capacity_gib,
        f" {capacity_label}",
        color=VERMILION,
        va="center",
        fontsize=8.5,
        fontweight="bold",
        clip_on=False,
    )
    from matplotlib.patches import Patch

    handles = [Patch(**LECTURE, label="zero-paper (the lecture's 16 bytes/param)")] + [
        Patch(color=MEMORY_COLORS[k], label=f"torch profile: {MEMORY_LABELS[k]}") for k in keys
    ]
    bottom_legend(fig, handles, ncols=5)
    return fig


def _short_gib(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else (f"{v:,.1f}" if v >= 10 else f"{v:,.2f}")


# ---- part 4 -----------------------------------------------------------------------------------
SERIES = {
    "lecture": LECTURE,
    "paper": dict(facecolor=SKY, edgecolor="white", linewidth=0.6),
    "torch": dict(facecolor=BLUE, edgecolor="white", linewidth=0.6),
}


@styled
def comm_bars(names, sublabels, bytes_series, time_series, title, caption):
    """Two panels, bytes each GPU sends per step and the time that takes, one group of bars per
    strategy. Each series: (label, values (None where there is no number), style key of SERIES);
    the legend shows the bytes series' labels (say there what the time bars assume)."""
    import numpy as np
    from matplotlib.patches import Patch

    fig, (a1, a2) = new_figure(13, 5.6, title, caption, 1, 2, legend=True)
    x = np.arange(len(names))
    for ax, series, unit, head in (
        (a1, bytes_series, "GB sent per GPU per step", "Bytes on the wire"),
        (a2, time_series, "ms per step (before overlap)", "Time on the link"),
    ):
        k = len(series)
        w = 0.8 / k
        top = 0.0
        for j, (_label, vals, style) in enumerate(series):
            idx = [i for i, v in enumerate(vals) if v is not None]
            bars = ax.bar(x[idx] + (j - (k - 1) / 2) * w, [vals[i] for i in idx], w, zorder=2, **SERIES[style])
            _bar_labels(
                ax, bars, [_num_label(vals[i]) for i in idx], fontsize=7, color=MUTED if j < k - 1 else INK, pad=1
            )
            top = max([top] + [vals[i] for i in idx])
        ax.set_xticks(x, [f"{n}\n{s}" for n, s in zip(names, sublabels)], fontsize=8)
        ax.set_ylabel(unit)
        ax.set_ylim(0, top * 1.15)
        ax.set_title(head, loc="left")
    handles = [Patch(**SERIES[style], label=label) for label, _, style in bytes_series]
    bottom_legend(fig, handles, ncols=len(handles))
    return fig


def _num_label(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else (f"{v:,.1f}" if v >= 1 else f"{v:,.2f}")


# ---- part 5 -----------------------------------------------------------------------------------
@styled
def scenario_memory(scenarios, title, caption):
    """One panel per scenario: per-GPU memory of a few plans, stacked by item, against the GPU's
    capacity. Each scenario: {"title", "capacity_gib", "plans": [{"label", "params", "grads",
    "optimizer", "activations", "other" (GiB), "note" (text above the bar), "pick" (bool)}]}."""
    import numpy as np

    keys = ("params", "grads", "optimizer", "activations", "other")
    fig, axes = new_figure(4.3 * len(scenarios), 5.6, title, caption, 1, len(scenarios), legend=True)
    axes = np.atleast_1d(axes)
    for ax, sc in zip(axes, scenarios):
        plans = sc["plans"]
        x = np.arange(len(plans))
        bottom = np.zeros(len(plans))
        for k in keys:
            v = np.array([p[k] for p in plans])
            ax.bar(x, v, 0.62, bottom=bottom, color=MEMORY_COLORS[k], zorder=2)
            bottom += v
        cap = sc["capacity_gib"]
        top = cap * 1.45  # taller bars are cut at the top and say so: the capacity line is what matters
        for i, p in enumerate(plans):
            over = bottom[i] > top
            y = top * 0.93 if over else bottom[i] + top * 0.012
            ax.text(
                i,
                y,
                ("\u2191 " if over else "") + p["note"],
                ha="center",
                va="bottom",
                fontsize=7.5,
                color=GREEN if p["fits"] else VERMILION,
                fontweight="bold" if p["pick"] else "normal",
                zorder=6,
                bbox=dict(fc="white", ec="none", pad=1.0, alpha=0.9) if over else None,
            )
            if p["pick"]:  # one outline around the search's choice
                ax.add_patch(
                    _rect(
                        i - 0.34,
                        0,
                        0.68,
                        min(bottom[i], top) * 1.01,
                        fill=False,
                        ec=INK,
                        lw=1.6,
                        zorder=4,
                        clip_on=False,
                    )
                )
        ax.axhline(cap, color=VERMILION, ls="--", lw=1.2, zorder=3)
        ax.set_ylim(0, top)
        ax.set_xticks(x, [p["label"] for p in plans], fontsize=8)
        ax.set_title(sc["title"], fontsize=10)
        ax.set_ylabel("per GPU (GiB)")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    bottom_legend(
        fig,
        [Patch(color=MEMORY_COLORS[k], label=MEMORY_LABELS[k]) for k in keys]
        + [Line2D([], [], color=VERMILION, ls="--", label="the GPU's memory")],
        ncols=6,
    )
    return fig


# ---- part 2: the pipeline schedules ------------------------------------------------------------
FWD, BWD = (BLUE, SKY), (VERMILION, ORANGE)  # chunk 0, chunk 1 (interleaved, the V)
WGT = (GREEN, YELLOW)  # the weights' backward (W) of the zero-bubble schedules, apart from the inputs' (I)
BUBBLE = dict(facecolor="#F6E3E3", hatch="xx", edgecolor="#D9A5A5", linewidth=0)


@styled
def pipeline_schedules(panels, title, caption):
    """One row per schedule: each rank's forwards and backwards over time, idle time hatched.
    Each panel: {"title", "pp", "slots": [(rank, start, end, kind, microbatch, chunk)], "unit"
    (time of one slot, in forwards of a whole rank's layers), "span" (x-axis end, shared)}."""
    from matplotlib.patches import Patch

    span = max(p["span"] for p in panels)
    fig, axes = new_figure(
        12.5,
        1.25 + 1.45 * len(panels) + 0.15 * sum(p["pp"] for p in panels),
        title,
        caption,
        len(panels),
        1,
        legend=True,
        sharex=True,
    )
    for ax, p in zip(axes, panels):
        pp, u = p["pp"], p["unit"]
        end = max(s[2] for s in p["slots"]) * u
        ax.add_patch(_rect(0, -0.5, end, pp, zorder=0, **BUBBLE))  # idle unless covered by work
        for rank, start, stop, kind, mb, chunk in p["slots"]:
            c = (FWD if kind == "F" else WGT if kind == "W" else BWD)[chunk % 2]
            ax.add_patch(_rect(start * u, rank - 0.42, (stop - start) * u, 0.84, fc=c, ec="white", lw=0.6, zorder=2))
            if (stop - start) * u >= 0.5:  # the micro-batch number, where it fits
                ax.text(
                    (start + stop) / 2 * u,
                    rank,
                    str(mb + 1),
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white" if chunk % 2 == 0 else INK,
                    zorder=3,
                )
        ax.set_ylim(pp - 0.5, -0.5)
        ax.set_yticks(range(pp), [f"GPU {r}" for r in range(pp)], fontsize=8)
        ax.set_xlim(0, span)
        ax.grid(False)
        ax.spines["left"].set_visible(False)
        ax.tick_params(axis="y", length=0)
        ax.set_title(p["title"], loc="left", fontsize=9.5)
        ax.axvline(end, color=INK, lw=1, ls=":")
    axes[-1].set_xlabel(
        "time (unit: the forward of one micro-batch through one GPU's layers; a backward takes 2, "
        "split into the inputs' and the weights' 1 + 1 by the zero-bubble schedules)"
    )
    bottom_legend(
        fig,
        [
            Patch(color=FWD[0], label="forward"),
            Patch(color=BWD[0], label="backward"),
            Patch(color=FWD[1], label="forward, 2nd virtual stage"),
            Patch(color=BWD[1], label="backward, 2nd virtual stage"),
            Patch(color=WGT[0], label="weights' backward (W)"),
            Patch(color=WGT[1], label="W, 2nd virtual stage"),
            Patch(**BUBBLE, label="idle (the bubble)"),
        ],
        ncols=4,
    )
    return fig
