"""Where the package finds files that are not Python modules.

The SQL lives in the top-level ``sql/`` directory of the source tree (that is where people
edit it): ``sql/migrations/`` and ``sql/functions/``, read by :mod:`queen_tw.db.schema`.  A
regular install has no source tree, so the build copies ``sql/`` with its sub-directories into
the wheel as ``queen_tw/_sql/`` (see ``setup.py``).  Everything that needs the SQL asks
:func:`sql_dir` instead of guessing.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def sql_dir() -> Path:
    """Return the directory holding ``migrations/`` and ``functions/``.

    A source checkout (editable install, tests, ``make run``) is recognised by the
    ``setup.cfg`` next to the package, so a stray top-level ``sql/`` in site-packages
    is never mistaken for ours; otherwise the copy shipped inside the package is used.
    """
    checkout = _PACKAGE_DIR.parent
    if (checkout / "setup.cfg").is_file() and (checkout / "sql").is_dir():
        return checkout / "sql"
    return _PACKAGE_DIR / "_sql"
