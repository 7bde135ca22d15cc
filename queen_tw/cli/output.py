"""How the admin CLI prints: aligned tables and ``key: value`` blocks for people, the
server's JSON untouched (``--json``) for scripts."""

import json
import sys
from typing import Any, Iterable, List, Sequence, TextIO


def print_json(data: Any, out: TextIO = sys.stdout) -> None:
    """``data`` as indented JSON, keys in the server's order."""
    out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                out: TextIO = sys.stdout, empty: str = "(none)") -> None:
    """Left-aligned columns as wide as their widest cell; ``empty`` when there is no row."""
    cells = [[_cell(value) for value in row] for row in rows]
    if not cells:
        out.write(empty + "\n")
        return
    widths = [max(len(line[i]) for line in [list(headers), *cells])
              for i in range(len(headers))]
    for line in [list(headers), *cells]:
        padded = (text.ljust(width) for text, width in zip(line, widths, strict=True))
        out.write("  ".join(padded).rstrip() + "\n")


def print_fields(pairs: Iterable[Sequence[Any]], out: TextIO = sys.stdout) -> None:
    """``label: value`` lines with the values aligned."""
    items: List[Sequence[Any]] = list(pairs)
    width = max((len(str(label)) for label, _ in items), default=0)
    for label, value in items:
        out.write(f"{str(label) + ':':<{width + 1}} {_cell(value)}\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
