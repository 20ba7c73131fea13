"""``deeploc-report --latex``: the report's tables as booktabs LaTeX, ready for a paper (``tables.tex``).

Every cell is the Markdown table's own text, converted (``±`` -> ``$\\pm$``, bold -> ``\\textbf``, ``—`` -> ``---``,
special characters escaped), so the numbers are the same by construction. Each table's caption says what the
numbers are, their metric convention, the confidence intervals and what produced them (provenance). Needs
``\\usepackage{booktabs}`` (and ``graphicx`` for the wide tables' ``\\resizebox``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_SYMBOLS = {"±": r"$\pm$", "—": "---", "–": "--", "→": r"$\to$", "−": "$-$", "Δ": r"$\Delta$", "✓": r"\checkmark"}


def escape(text: str) -> str:
    """`text` as LaTeX: special characters escaped, ``±``, ``→`` and dashes as their LaTeX forms."""
    out = "".join(_ESCAPES.get(c, c) for c in str(text)).replace("--", "-{}-")  # "--ci-seed", not an en dash
    for symbol, latex in _SYMBOLS.items():
        out = out.replace(symbol, latex)
    return out


def cell(text: str) -> str:
    """A Markdown table cell as LaTeX (``**x**`` -> ``\\textbf{x}``)."""
    bold = re.fullmatch(r"\*\*(.*)\*\*", str(text))
    return rf"\textbf{{{escape(bold.group(1))}}}" if bold else escape(text)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str, label: str) -> str:
    """A booktabs table (first column left-aligned, the others right-aligned), scaled to the text width."""
    spec = "l" + "r" * (len(header) - 1)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{escape(caption)}}}",
        rf"\label{{{label}}}",
        r"\resizebox{\textwidth}{!}{%",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(cell(h) for h in header) + r" \\",
        r"\midrule",
        *(" & ".join(cell(c) for c in row) + r" \\" for row in rows),
        r"\bottomrule",
        r"\end{tabular}}",
        r"\end{table}",
    ]
    return "\n".join(lines)
