"""Does it still load: a model's state-dict spec (keys, shapes, dtypes, persistence, ties), and
what loading a checkpoint into it would do, in ``load_state_dict``'s words."""

from __future__ import annotations

from pytest_modelhooks.checkpoint.loads import check_loads, load_problems, read_checkpoint
from pytest_modelhooks.checkpoint.spec import StateDictSpec, StateEntry, state_dict_spec

__all__ = [
    "StateDictSpec",
    "StateEntry",
    "check_loads",
    "load_problems",
    "read_checkpoint",
    "state_dict_spec",
]
