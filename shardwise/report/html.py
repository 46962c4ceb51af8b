"""One self-contained HTML page from lecture Sections: tables as <table>, figures as inline <svg>.

No scripts, no fonts, no stylesheets or images from anywhere else: the file renders offline,
can be mailed, and archived with the run it describes.
"""

from __future__ import annotations

from html import escape

from shardwise.report.lecture.section import Section, Table

_CSS = """
:root { --ink:#222; --muted:#666; --rule:#ddd; --pick:#eef6ee; --bad:#b03a2e; --note:#fff8e6; --fix:#fdeeee; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink);
       max-width: 1180px; margin: 2rem auto; padding: 0 1.2rem; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; }
h2 { margin-top: 2.6rem; border-bottom: 2px solid var(--ink); padding-bottom: .2rem; }
h3 { font-size: 1rem; margin: 1.4rem 0 .4rem; }
.sub { color: var(--muted); margin-top: 0; }
nav ol { columns: 2; color: var(--muted); }
table { border-collapse: collapse; font-size: .86rem; margin: .4rem 0 .3rem; width: 100%; }
th, td { padding: .28rem .55rem; border-bottom: 1px solid var(--rule); vertical-align: top; text-align: left; }
th { border-bottom: 2px solid #999; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.pick td { background: var(--pick); font-weight: 600; }
tr.bad td { color: var(--bad); }
tr.dim td { color: var(--muted); }
.tcap { color: var(--muted); font-size: .8rem; margin: 0 0 1rem; }
.note { padding: .5rem .8rem; margin: .5rem 0; border-left: 4px solid #999; background: #f6f6f6; }
.note.correction { border-color: var(--bad); background: var(--fix); }
.note.takeaway { border-color: #2e7d32; background: var(--pick); }
.note .src { display: block; color: var(--muted); font-size: .8rem; margin-top: .2rem; }
figure { margin: 1.2rem 0 1.8rem; }
figure svg { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: .85rem; margin-top: .3rem; }
footer { margin-top: 3rem; color: var(--muted); font-size: .8rem; border-top: 1px solid var(--rule); }
"""

_NOTE_LABEL = {"info": "Note", "correction": "Where the lecture differs", "takeaway": "Takeaway"}


def table_html(t: Table) -> str:
    head = "".join(f"<th{_cls(i, t)}>{escape(c)}</th>" for i, c in enumerate(t.columns))
    body = []
    for r, row in enumerate(t.rows):
        mark = f' class="{t.marks[r]}"' if r in t.marks else ""
        cells = "".join(f"<td{_cls(i, t)}>{escape(v)}</td>" for i, v in enumerate(row))
        body.append(f"<tr{mark}>{cells}</tr>")
    cap = f'<p class="tcap">{escape(t.caption)}</p>' if t.caption else ""
    return (
        f"<h3>{escape(t.title)}</h3>\n<table><thead><tr>{head}</tr></thead>\n<tbody>"
        + "\n".join(body)
        + f"</tbody></table>{cap}"
    )


def _cls(i: int, t: Table) -> str:
    return ' class="num"' if i in t.right else ""


def section_html(s: Section, svgs: dict[str, str]) -> str:
    out = [
        f'<section id="{escape(s.key)}">',
        f"<h2>Part {s.number}: {escape(s.title)}</h2>",
        f"<p>{escape(s.intro)}</p>",
    ]
    out += [table_html(t) for t in s.tables]
    for n in s.notes:
        src = f'<span class="src">Source: {escape(n.source)}</span>' if n.source else ""
        out.append(f'<div class="note {n.kind}"><strong>{_NOTE_LABEL[n.kind]}:</strong> {escape(n.text)}{src}</div>')
    for f in s.figures:
        if f.stem in svgs:
            out.append(
                f'<figure id="fig-{escape(f.stem)}">{svgs[f.stem]}<figcaption>{escape(f.caption)}</figcaption></figure>'
            )
    out.append("</section>")
    return "\n".join(out)


def page(sections: list[Section], svgs: dict[str, str], title: str, subtitle: str, footer: str) -> str:
    """The whole report. `svgs` maps a figure's stem to its inline <svg> (figures.svg_text)."""
    toc = "".join(f'<li><a href="#{escape(s.key)}">{escape(s.title)}</a></li>' for s in sections)
    body = "\n".join(section_html(s, svgs) for s in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f'<h1>{escape(title)}</h1><p class="sub">{escape(subtitle)}</p>\n'
        f"<nav><ol>{toc}</ol></nav>\n{body}\n<footer>{escape(footer)}</footer>\n</body></html>\n"
    )
