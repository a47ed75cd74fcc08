"""Keep the package readable: no module in ``src/ornis`` over 400 lines, no function over 80 lines. Prints each
offender; exits 1 when there is one.

    python scripts/check_sizes.py [src/ornis]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def offenders(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            found.append(f"{path}: {lines} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(
                        f"{path}:{node.lineno}: {node.name}() is {length} lines (at most {MAX_FUNCTION_LINES})"
                    )
    return found


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "src" / "ornis")
    found = offenders(root)
    for line in found:
        print(line)
    print(f"{len(found)} module(s) or function(s) over the limits")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
