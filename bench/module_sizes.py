"""Module and function sizes of the assay packages (issue 17's figures; docs/ARCHITECTURE.md).

    python bench/module_sizes.py

Counts every line of each ``.py`` file of curation/, mining/, training/, pipelines/, judge_prompts/
and assay/ (``__init__`` files included), and the lines of each function or method from its ``def``
to its last line. Last line: ``modules=N median_lines=M over_500=K functions_over_80=F``.
"""

from __future__ import annotations

import ast
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("assay", "curation", "mining", "training", "pipelines", "judge_prompts")


def main() -> None:
    sizes: dict[str, int] = {}
    long_functions: list[tuple[int, str]] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            rel = str(path.relative_to(ROOT))
            sizes[rel] = len(text.splitlines())
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > 80:
                        long_functions.append((length, f"{rel}:{node.lineno} {node.name}"))
    big = sorted(((n, m) for m, n in sizes.items() if n > 500), reverse=True)
    print("modules over 500 lines:")
    for n, m in big:
        print(f"  {n:5d}  {m}")
    print("functions over 80 lines:")
    for n, f in sorted(long_functions, reverse=True):
        print(f"  {n:5d}  {f}")
    median = statistics.median(sizes.values())
    print(
        f"modules={len(sizes)} median_lines={median:g} over_500={len(big)} functions_over_80={len(long_functions)}"
    )


if __name__ == "__main__":
    main()
