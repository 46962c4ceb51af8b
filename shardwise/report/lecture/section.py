"""What one part of the lecture produces: tables, notes and figures, as plain data.

The same Section is printed in the terminal (rich) and written into the HTML page, so a number
is formatted once and shown identically in both. `data` keeps the raw numbers (bytes, seconds)
for the tests and for --json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

NOTE_KINDS = ("info", "correction", "takeaway")


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)  # column indices aligned right (numbers)
    marks: dict[int, str] = field(default_factory=dict)  # row index -> "pick" | "bad" | "dim"
    caption: str = ""

    def __post_init__(self):
        for r in self.rows:
            assert len(r) == len(self.columns), (self.title, r)


@dataclass
class Note:
    kind: str  # info | correction | takeaway
    text: str
    source: str = ""  # the citation for a correction

    def __post_init__(self):
        assert self.kind in NOTE_KINDS, self.kind


@dataclass
class FigureSpec:
    """One chart. `draw()` returns a matplotlib Figure; it runs only when figures are wanted."""

    stem: str  # file name without extension, e.g. "3-zero-memory"
    title: str
    caption: str
    draw: Callable[[], object]


@dataclass
class Section:
    key: str  # why | strategies | zero | comm | choose
    number: int
    title: str
    intro: str
    tables: list[Table] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    figures: list[FigureSpec] = field(default_factory=list)
    data: dict = field(default_factory=dict)
