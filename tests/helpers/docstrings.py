"""Real text pairs from Python source: (first line, the words after it) of the docstrings of the
functions and classes under a folder, read with ``ast`` (nothing is imported), unique on both sides
after case folding. The mining tests take them from the standard library (the same on every machine
with this Python); ``bench/mining_vs_st.py`` from site-packages (more of them)."""

from __future__ import annotations

import ast
from pathlib import Path


def docstring_pairs(
    root: str | Path, n: int, *, words: int = 48, recursive: bool = True
) -> list[tuple[str, str]]:
    """Up to ``n`` pairs: a first line of at least 4 words -> the next ``words`` words (at least 12),
    files in sorted order (``recursive``: the whole tree under ``root``)."""
    files = Path(root).rglob("*.py") if recursive else Path(root).glob("*.py")
    seen_q, seen_d, out = set(), set(), []
    for path in sorted(files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            first, _, rest = doc.strip().partition("\n")
            first, rest = first.strip(), " ".join(rest.split())
            if len(first.split()) < 4 or len(rest.split()) < 12:
                continue
            rest = " ".join(rest.split()[:words])
            qk, dk = first.casefold(), rest.casefold()
            if qk in seen_q or dk in seen_d:
                continue
            seen_q.add(qk)
            seen_d.add(dk)
            out.append((first, rest))
            if len(out) == n:
                return out
    return out
