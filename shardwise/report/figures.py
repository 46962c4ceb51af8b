"""The lecture's charts (matplotlib, Agg backend), one style and one palette for all of them.

Every function takes numbers already computed by the library and returns a matplotlib Figure;
nothing here computes a memory, a volume or a time. matplotlib is imported lazily, so the rest
of shardwise runs where it is not installed (`pip install shardwise[plot]`).
"""
from __future__ import annotations

import io
import re
from pathlib import Path

from shardwise.errors import ShardwiseError

# Okabe-Ito: distinguishable with the common colour-vision deficiencies, and in grayscale print.
BLUE, ORANGE, GREEN, PINK, SKY, VERMILION, YELLOW, GRAY = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#8C8C8C")
INK, MUTED, LIGHT = "#222222", "#666666", "#D9D9D9"
LAYER = "#5A6B8C"  # a transformer layer (all of its states) in the diagrams

# one colour per meaning, everywhere
MEMORY_COLORS = {"params": BLUE, "grads": GREEN, "optimizer": ORANGE, "activations": PINK, "other": GRAY}
MEMORY_LABELS = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer states",
                 "activations": "activations", "other": "buffers + overhead"}
STRATEGY_COLORS = {"DDP": BLUE, "ZeRO-1": SKY, "ZeRO-2": GREEN, "ZeRO-3": ORANGE, "TP": PINK, "PP": VERMILION}
LECTURE = dict(color="#C8C8C8", hatch="///", edgecolor="#7A7A7A", linewidth=0.6)  # the lecture's numbers
CAPACITY_COLORS = (GREEN, ORANGE, VERMILION, PINK, BLUE)

FORMATS = ("png", "svg")
_STYLE = {
    "font.family": "DejaVu Sans", "font.size": 9.5, "axes.titlesize": 11, "axes.titleweight": "bold",
    "axes.labelsize": 9.5, "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": MUTED,
    "axes.labelcolor": INK, "xtick.color": INK, "ytick.color": INK, "axes.grid": True, "axes.grid.axis": "y",
    "grid.alpha": 0.3, "grid.linewidth": 0.6, "legend.frameon": False, "legend.fontsize": 8.5,
    "figure.facecolor": "white", "savefig.facecolor": "white", "svg.hashsalt": "shardwise",
    "svg.fonttype": "none",  # text stays text: small files, selectable in the HTML page
}


def _plt():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ShardwiseError("figures need matplotlib: pip install 'shardwise[plot]' (or use --no-figures)") \
            from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def new_figure(width: float, height: float, title: str, caption: str, nrows: int = 1, ncols: int = 1, **kw):
    """A figure with a title and a caption line under the axes (call inside a @styled function)."""
    fig, axes = _plt().subplots(nrows, ncols, figsize=(width, height), **kw)
    bottom = 0.3 / height  # room for the caption line
    fig.set_layout_engine("constrained", rect=(0, bottom, 1, 1 - bottom), h_pad=0.06, w_pad=0.06)
    fig.suptitle(title, fontsize=12.5, fontweight="bold", color=INK)
    fig.text(0.01, 0.012, caption, fontsize=8, color=MUTED, ha="left", va="bottom", style="italic", wrap=True)
    return fig, axes


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
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out_dir / f"{stem}.{fmt}"
        meta = {"Date": None} if fmt == "svg" else {"Software": None}  # reproducible files
        with plt.rc_context(_STYLE):
            fig.savefig(p, format=fmt, dpi=dpi, metadata=meta)
        paths.append(p)
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
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(r'url\(#([^)]+)\)', rf'url(#{prefix}-\1)', svg)
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

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.12", fc=fc, ec=ec, lw=lw,
                                alpha=alpha, **kw))


def _arrow(ax, xy_from, xy_to, color=MUTED, style="-|>", lw=1.3, **kw):
    ax.annotate("", xy=xy_to, xytext=xy_from, arrowprops=dict(arrowstyle=style, color=color, lw=lw,
                                                              shrinkA=1, shrinkB=1, **kw))


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
    _ring(ax, xs, 2.45, "all-reduce of all gradients after backward")
    _state_legend(ax, 1.0)

    # fully sharded: each GPU keeps 1/N of every state, gathers weights just in time
    ax = axes[0][1]
    _panel(ax, "Fully sharded data parallel (ZeRO-3 / FSDP)",
           "each GPU keeps 1/N of parameters, gradients and optimizer states")
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
    _panel(ax, "Pipeline (model) parallel", f"{model_name}'s {layers} layers cut into {n} stages, "
                                            "micro-batches flow through")
    per = layers // n
    for i, x in enumerate(xs):
        _box(ax, x, 3.1, _GPU_W, 2.6, fc="#FBF3EE")
        ax.text(x + _GPU_W / 2, 5.35, f"GPU {i}", ha="center", fontsize=9, fontweight="bold")
        lo, hi = i * per + 1, (i + 1) * per if i < n - 1 else layers
        for k in range(4):  # a stack of layer blocks
            ax.add_patch(_rect(x + 0.3, 3.45 + k * 0.42, _GPU_W - 0.6, 0.3, fc=LAYER, ec="none"))
        ax.text(x + _GPU_W / 2, 3.2, f"layers {lo}-{hi}", ha="center", fontsize=7.5, color=MUTED)
        if i < n - 1:
            _arrow(ax, (x + _GPU_W + 0.02, 4.9), (xs[i + 1] - 0.02, 4.9), color=BLUE, lw=1.6)
            _arrow(ax, (xs[i + 1] - 0.02, 3.9), (x + _GPU_W + 0.02, 3.9), color=VERMILION, lw=1.6)
    ax.add_patch(_rect(xs[0] + 0.25, 6.35, _GPU_W - 0.5, 0.45, fc=SKY, ec=INK, lw=0.6))
    ax.text(xs[0] + _GPU_W / 2, 6.575, "micro-batches", ha="center", va="center", fontsize=8)
    _arrow(ax, (xs[0] + _GPU_W / 2, 6.33), (xs[0] + _GPU_W / 2, 5.75))
    ax.text(5.1, 2.45, "send activations forward, their gradients back: point-to-point, one boundary each",
            ha="center", fontsize=8.5, color=INK)
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
