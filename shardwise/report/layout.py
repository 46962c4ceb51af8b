"""Text that stays readable in any terminal width: tables that drop their least important columns
instead of squeezing them, plan names that never break across lines, and shell commands that
wrap with a continuation backslash (still one command when pasted)."""

from __future__ import annotations

import re
import shlex
import textwrap
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from shardwise.spec.plan import SCHEDULES

# A plan's short name (Plan.short()): "dp8 tp1 pp2 cp2 zero1 mbs1 ga64 1f1b ep8 sp rc-selective ...";
# the longest schedule name first, so "interleaved-zb" is not cut at "interleaved"
PLAN_NAME = re.compile(
    r"dp\d+ tp\d+ pp\d+(?: cp\d+(?:/a2a)?)? zero\d mbs\d+ ga\d+"
    rf"(?: (?:(?:{'|'.join(map(re.escape, sorted(SCHEDULES, key=len, reverse=True)))})(?:/v\d+)?|hsdp\d+|last-\d+|ep\d+|sp|rc-[a-z-]+(?::\d+)?"
    r"|offload-[a-z]+|attn-[a-z]+|fp8-[a-z]+|compile))*"
)
_GLUE = "\x00"  # stands in for a space that must not break a line (textwrap splits on ASCII whitespace only)


@dataclass(frozen=True)
class Column:
    """One table column. priority: 0 is kept longest; columns are dropped from the highest number
    down until the rest fit. wrap: prose that may wrap (needs only min_width); every other column
    is never wrapped nor cut."""

    name: str
    priority: int
    justify: str = "right"
    wrap: bool = False
    min_width: int = 20
    style: str | None = None


def cell_width(cell: str) -> int:
    return Text.from_markup(cell).cell_len


# The frame of every table() (plan's, estimate's, the model catalog's): a rule under the header,
# no vertical rules, two spaces between columns, none at the edges. It is the narrowest frame that
# still reads as a table, so a narrow terminal loses as few columns as possible.
FRAME = dict(box=box.SIMPLE_HEAD, collapse_padding=True, show_edge=False, pad_edge=False)


def overhead(n: int) -> int:
    """Columns FRAME adds to the text of n columns: two spaces between neighbours."""
    return 2 * max(n - 1, 0)


def fitting(columns: list[Column], rows: list[list[str]], width: int) -> list[int]:
    """Indices of the columns to show (in their order): the most important first, each while the
    table still fits `width`."""
    need = []
    for j, col in enumerate(columns):
        natural = max([cell_width(col.name)] + [cell_width(r[j]) for r in rows])
        need.append(min(natural, col.min_width) if col.wrap else natural)
    keep, used = [], 0
    for j in sorted(range(len(columns)), key=lambda j: columns[j].priority):
        if used + need[j] + overhead(len(keep) + 1) <= width or not keep:  # the first always shows
            keep.append(j)
            used += need[j]
    return sorted(keep)


def table(console: Console, columns: list[Column], rows: list[list[str]], **kw) -> Table:
    """A rich Table in FRAME of the columns that fit the console, in their own order; kw (title,
    title_justify, ...) go to Table."""
    keep = fitting(columns, rows, console.width)
    t = Table(**(FRAME | kw))
    for j in keep:
        c = columns[j]
        t.add_column(
            c.name,
            justify=c.justify,
            no_wrap=not c.wrap,
            overflow="fold" if c.wrap else "ellipsis",
            style=c.style,
            ratio=1 if c.wrap else None,
        )
    for r in rows:
        t.add_row(*(r[j] for j in keep))
    return t


def glue_names(text: str) -> str:
    return PLAN_NAME.sub(lambda m: m.group(0).replace(" ", _GLUE), text)


def wrap(text: str, width: int, first: str = "", rest: str | None = None) -> list[str]:
    """Lines of `text` at most `width` wide (a plan name longer than the line is the only
    exception), never breaking inside a plan name. first / rest: the first line's prefix and the
    others' indent (default: as wide as `first`)."""
    rest = " " * len(first) if rest is None else rest
    lines = textwrap.wrap(
        glue_names(text),
        width=max(width, len(first) + 10),
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    )
    return [line.replace(_GLUE, " ") for line in lines] or [first.rstrip()]


def print_wrapped(c: Console, text: str, first: str = "", rest: str | None = None, style: str | None = None) -> None:
    """Plain text (no markup) wrapped by wrap() for the console's width."""
    for line in wrap(text, c.width, first, rest):
        c.print(Text(line, style=style or ""), soft_wrap=True)


def print_segments(c: Console, segments: list[str], sep: str = "  ·  ", indent: str = "  ") -> None:
    """Segments (markup allowed) joined by `sep`, a new line (with `indent`) where the next would
    not fit: a segment, such as a plan name, is never split."""
    line, lead = "", ""  # lead: what a new line starts with (nothing on the first)
    for s in segments:
        cand = lead + s if not line else line + sep + s
        if cell_width(cand) <= c.width:
            line = cand
            continue
        if line:
            c.print(line, soft_wrap=True)
            lead = indent
        line = lead + s
        if cell_width(line) > c.width:  # one segment wider than the console: wrap it on its own
            print_wrapped(c, Text.from_markup(s).plain, lead, indent + "  ")
            line, lead = "", indent
    if line:
        c.print(line, soft_wrap=True)


def command_lines(argv: list[str], width: int, indent: str = "    ") -> list[str]:
    """A shell command as lines of at most `width` columns, continued with ' \\' (a pasted block
    is still one command). Each argument is quoted for the shell where it needs it; a flag stays on
    the line of its value."""
    words = [shlex.quote(w) for w in argv]
    pairs, i = [], 0
    while i < len(words):  # keep "--tp 8" together
        if words[i].startswith("-") and i + 1 < len(words) and not words[i + 1].startswith("-"):
            pairs.append(words[i] + " " + words[i + 1])
            i += 2
        else:
            pairs.append(words[i])
            i += 1
    lines, line = [], ""
    for p in pairs:
        cand = p if not line else line + " " + p
        if line and len(cand) + 2 > width:
            lines.append(line + " \\")
            line = indent + p
        else:
            line = cand
    return lines + [line]
