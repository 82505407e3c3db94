"""A report as a list of blocks, rendered two ways from the same blocks: Markdown (report.md,
images beside it) and one self-contained HTML file (report.html, images embedded), so the two
never disagree."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str  # plain text; **bold** is the only markup, rendered in both formats


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: str = ""  # one letter per column: l or r (default: first l, the rest r)


@dataclass
class Image:
    path: Path  # a PNG in the run directory
    alt: str


@dataclass
class Verdict:
    claim: str
    supported: bool | None  # None: not measured, or not settled (settled False)
    text: str
    settled: bool = True  # False: the intervals reach both sides of the line (supported None)


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> None:
        self.blocks.extend(b for b in blocks if b is not None)


def mark(v: Verdict) -> str:
    """The one word for a verdict's state, wherever it is printed."""
    if not v.settled:
        return "not settled"
    return {True: "supported", False: "not supported", None: "not measured"}[v.supported]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document, base: Path) -> str:
    lines = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            lines += [b.text, ""]
        elif isinstance(b, Table):
            align = b.align or "l" + "r" * (len(b.header) - 1)
            lines.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, Image):
            rel = b.path.relative_to(base) if b.path.is_relative_to(base) else b.path
            lines += [f"![{b.alt}]({rel.as_posix()})", ""]
        elif isinstance(b, Verdict):
            lines += [f"- **{b.claim}: {mark(b)}.** {b.text}", ""]
    return "\n".join(lines).rstrip() + "\n"


def _inline(text: str) -> str:
    parts = html.escape(text).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{margin-top:1.6em;border-bottom:1px solid #eee;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em}th{background:#f5f5f7}
td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.verdict{padding:.5em .8em;margin:.4em 0;border-left:5px solid #999;background:#fafafa}
.supported{border-color:#2e7d32}.not-supported{border-color:#c62828}.not-measured{border-color:#999}
.not-settled{border-color:#ef6c00}
.tag{font-weight:600}
"""


def to_html(doc: Document) -> str:
    """One file with the images inlined as data: URIs, so it can be mailed or attached."""
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(doc.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(doc.title)}</h1>",
    ]
    for b in doc.blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Table):
            align = b.align or "l" + "r" * (len(b.header) - 1)
            cls = lambda i, align=align: " class='r'" if align[i] == "r" else ""  # noqa: E731
            head = "".join(f"<th{cls(i)}>{_inline(h)}</th>" for i, h in enumerate(b.header))
            body = "".join(
                "<tr>"
                + "".join(f"<td{cls(i)}>{_inline(c)}</td>" for i, c in enumerate(r))
                + "</tr>"
                for r in b.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode()
            out.append(f"<img alt='{html.escape(b.alt)}' src='data:image/png;base64,{data}'>")
        elif isinstance(b, Verdict):
            state = mark(b)
            out.append(
                f"<div class='verdict {state.replace(' ', '-')}'><span class='tag'>"
                f"{html.escape(b.claim)}: {state}.</span> {_inline(b.text)}</div>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write(doc: Document, folder: Path, stem: str = "report") -> tuple[Path, Path]:
    md, page = folder / f"{stem}.md", folder / f"{stem}.html"
    md.write_text(to_markdown(doc, folder), encoding="utf-8")
    page.write_text(to_html(doc), encoding="utf-8")
    return md, page
