"""The seed lecture ("Lecture 14: Distributed Training"), its five parts computed by shardwise.

Every number comes from the library (ModelSpec, shardwise.estimate, the pipeline schedule model,
shardwise.search); the lecture's own figures are reproduced only to be set beside the library's
and corrected, with the reason and the source.

    from shardwise.report.lecture import Lecture, Settings
    lec = Lecture(Settings(model="llama-2-70b", gpus=64, gpu="h100-80gb"))
    lec.section("zero").tables[0].rows
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shardwise.errors import ShardwiseError, closest
from shardwise.report import figures
from shardwise.report.lecture import choose, comm, strategies, why, zero
from shardwise.report.lecture.section import FigureSpec, Note, Section, Table
from shardwise.spec.hardware import make_cluster
from shardwise.spec.presets import load_model

BUILDERS = {
    "why": why.build,
    "strategies": strategies.build,
    "zero": zero.build,
    "comm": comm.build,
    "choose": choose.build,
}
PARTS = tuple(BUILDERS)
TITLES = {
    "why": "Why distributed training",
    "strategies": "Parallelism strategies",
    "zero": "ZeRO",
    "comm": "Communication",
    "choose": "Choosing a strategy",
}
# the lecture's own setting, used where the user does not choose
LECTURE_MODEL, LECTURE_GPUS, LECTURE_GPU, LECTURE_NETWORK = "llama-7b", 8, "a100-80gb", "ib-ndr"


@dataclass(frozen=True)
class Settings:
    """What a user may choose; None = the lecture's own choice (7B, 8 GPUs, A100-80GB, 400 Gbit/s)."""

    model: str | None = None
    gpus: int | None = None
    gpu: str | None = None
    network: str | None = None
    gpus_per_node: int | None = None
    seq: int = 2048  # tokens per sequence of the default plan
    mbs: int = 1  # sequences per micro-batch of the default plan

    @property
    def customized(self) -> bool:
        """The user asked about their own model or cluster (part 5 then adds their scenario)."""
        return any(v is not None for v in (self.model, self.gpus, self.gpu))


def part_key(text: str) -> str:
    """'zero', '3' or 'ZeRO' -> 'zero'."""
    t = str(text).strip().lower()
    if t.isdigit() and 1 <= int(t) <= len(PARTS):
        return PARTS[int(t) - 1]
    if t in PARTS:
        return t
    raise ShardwiseError(f"unknown lecture part {text!r}; {closest(t, PARTS)} (or a number 1-{len(PARTS)})")


class Lecture:
    """The five parts for one setting. Sections are computed on first use and cached, so a part
    that quotes another (part 5's takeaways quote parts 1, 3 and 4) does not compute it twice."""

    def __init__(self, settings: Settings | None = None):
        self.settings = s = settings or Settings()
        if s.seq <= 0 or s.mbs <= 0:
            raise ShardwiseError(f"--seq and --mbs must be positive, got seq={s.seq}, mbs={s.mbs}")
        self.model = load_model(s.model or LECTURE_MODEL)
        self.cluster = make_cluster(
            s.gpu or LECTURE_GPU, s.gpus or LECTURE_GPUS, s.gpus_per_node, s.network or LECTURE_NETWORK
        )
        self._sections: dict[str, Section] = {}

    def section(self, key: str) -> Section:
        key = part_key(key)
        if key not in self._sections:
            self._sections[key] = BUILDERS[key](self)
        return self._sections[key]

    def sections(self, keys=PARTS) -> list[Section]:
        return [self.section(k) for k in keys]


def render_figures(
    sections: list[Section], out_dir: Path | None, formats=("png", "svg"), dpi: int = 110, inline: bool = False
) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Draw every figure once: write it to out_dir (if given) and/or keep it as inline SVG.

    Returns ({stem: [paths]}, {stem: svg element}).
    """

    paths: dict[str, list[Path]] = {}
    svgs: dict[str, str] = {}
    for s in sections:
        for i, f in enumerate(s.figures):
            fig = f.draw()
            prefix = f"p{s.number}f{i}"
            if out_dir is None:
                svgs[f.stem] = figures.svg_text(fig, prefix)
                figures.close(fig)
                continue
            if inline and "svg" not in formats:
                svgs[f.stem] = figures.svg_text(fig, prefix)
            paths[f.stem] = figures.save(fig, out_dir, f.stem, formats, dpi)
            if inline and "svg" in formats:  # the file just written: no second render
                svg = next(p for p in paths[f.stem] if p.suffix == ".svg")
                svgs[f.stem] = figures.inline_svg(svg.read_text(encoding="utf-8"), prefix)
    return paths, svgs


__all__ = [
    "FigureSpec",
    "Lecture",
    "Note",
    "PARTS",
    "Section",
    "Settings",
    "Table",
    "TITLES",
    "part_key",
    "render_figures",
]
