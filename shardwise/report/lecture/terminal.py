"""A lecture Section in the terminal (rich): the same tables and notes the HTML page shows."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from shardwise.report.lecture.section import Section

_ROW_STYLE = {"pick": "bold green", "bad": "red", "dim": "dim"}
_NOTE = {
    "info": ("note", "cyan"),
    "correction": ("where the lecture differs", "bold red"),
    "takeaway": ("takeaway", "bold green"),
}


def print_section(s: Section, console: Console | None = None, figure_paths: dict | None = None) -> None:
    c = console or Console()
    c.rule(Text(f"Part {s.number}: {s.title}", style="bold"))
    c.print(Text(s.intro))
    for t in s.tables:
        rt = RichTable(title=t.title, title_justify="left", title_style="bold", show_edge=False, pad_edge=False)
        for i, col in enumerate(t.columns):
            rt.add_column(col, justify="right" if i in t.right else "left", overflow="fold")
        for r, row in enumerate(t.rows):
            rt.add_row(*row, style=_ROW_STYLE.get(t.marks.get(r, "")))
        c.print()
        c.print(rt)
        if t.caption:
            c.print(Text(t.caption, style="dim"))
    for n in s.notes:
        label, style = _NOTE[n.kind]
        line = Text.assemble((f"{label}: ", style), n.text)
        if n.source:
            line.append(f"  [{n.source}]", style="dim")
        c.print()
        c.print(line)
    for f in s.figures:
        paths = (figure_paths or {}).get(f.stem)
        if paths:
            c.print(Text.assemble(("figure: ", "dim"), ", ".join(str(p) for p in paths)))
    c.print()
