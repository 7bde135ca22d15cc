"""Build hook: ship the top-level sql/ directory inside the wheel as queen_tw/_sql/.

All metadata is in setup.cfg.  This file exists only because setup.cfg cannot put files
from outside the package tree into the package: a regular (non-editable) install has no
source checkout, so queen_tw.paths.sql_dir() falls back to queen_tw/_sql/, filled here.
Editable installs read sql/ straight from the checkout and need no copy.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SQL_SOURCE = Path(__file__).resolve().parent / "sql"


class BuildPyWithSql(build_py):
    """build_py that also copies sql/**/*.sql to <build>/queen_tw/_sql/, keeping the
    sub-directories (migrations/, functions/) the schema installer reads."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib, "queen_tw", "_sql")
        # An in-tree build/ keeps what earlier builds copied: files since moved or removed
        # from sql/ must not ship.
        shutil.rmtree(target, ignore_errors=True)
        for source in sorted(SQL_SOURCE.rglob("*.sql")):
            destination = target / source.relative_to(SQL_SOURCE)
            self.mkpath(str(destination.parent))
            self.copy_file(str(source), str(destination))


setup(cmdclass={"build_py": BuildPyWithSql})
