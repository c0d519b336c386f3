"""``python -m pytest_modelhooks``: see :mod:`pytest_modelhooks.cli`."""

from pytest_modelhooks.cli import run

run()
