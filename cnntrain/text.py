"""Names shown in reports (class folders, image files, a checkpoint's or an exported file's
classes) are data: a Markdown cell or a matplotlib label must show `a|b`, `<script>`, `*bold*`,
`$x$` or a name with a newline as those characters, never as table syntax, HTML, emphasis or
mathtext. The exact names stay in the JSON and CSV files (csv and json quote them)."""

from __future__ import annotations

import re

# CommonMark lets any ASCII punctuation be backslash-escaped; these start markup inside a
# table cell: HTML (<, >, &), emphasis (*, _), code, links, strikethrough, GitHub's math ($),
# the cell border (|) and the escape itself. `_` inside a word (18-00_lenet5_mnist) is no
# emphasis, so it stays as it is there: run folders and overrides read as they are typed.
MARKDOWN = re.compile(r"[\\`*\[\]<>|&$~]|(?<![^\W_])_|_(?![^\W_])")


def visible(text) -> str:
    """`text` with every character that does not print (newline, tab, ESC, a right-to-left
    override, a lone surrogate from an undecodable file name) as its Python escape (\\n,
    \\x1b, \\u202e, \\udce9): a name stays on one line and cannot move the cursor or reorder
    what follows."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


def md_cell(value) -> str:
    """`value` as the text of a Markdown table cell that renders as exactly its characters; the
    spaces a cell would trim at either end are kept as &#32;."""
    text = visible(MARKDOWN.sub(r"\\\g<0>", str(value)))
    core = text.strip(" ")
    if not core:
        return "&#32;" * len(text)
    lead, trail = len(text) - len(text.lstrip(" ")), len(text) - len(text.rstrip(" "))
    return "&#32;" * lead + core + "&#32;" * trail


def md_code(text) -> str:
    """`text` as a Markdown code span: fenced with one backtick more than its longest run."""
    text = visible(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return (
        f"{fence} {text} {fence}"
        if text.startswith("`") or text.endswith("`")
        else f"{fence}{text}{fence}"
    )


def markdown_table(header: list, rows: list[list], align: str = "", pad: bool = True) -> str:
    """A Markdown table of `rows` under `header`, every cell through md_cell. `align`: a letter a
    column, "r" to align it right (numbers); `pad`: columns padded to one width, as the console
    shows them (without, each cell is only its text)."""
    cells = [[md_cell(c) for c in row] for row in (header, *rows)]
    widths = [max(len(row[c]) for row in cells) if pad else 1 for c in range(len(header))]
    right = [i < len(align) and align[i] == "r" for i in range(len(header))]

    def line(row):
        return (
            "| "
            + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right))
            + " |"
        )

    rule = "|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right)) + "|"
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


def plot_text(text) -> str:
    """`text` for a matplotlib label, title or tick: shown as its characters, never as mathtext
    (an even number of `$` would start it, and `$\\frac$` fails the whole figure), on one line."""
    return visible(text).replace("$", r"\$")
