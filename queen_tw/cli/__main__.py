"""``python -m queen_tw.cli``: the same as the ``queen-tw`` console script."""

from queen_tw.cli.main import run

run()
