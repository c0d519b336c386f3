"""syrupy snapshots of model summaries, layer sizes and activation statistics.

:class:`ModelSnapshotExtension` stores each snapshot as a plain ``.txt`` file under
``__snapshots__/<test file>/<test name>.txt``: the same text ``str()`` gives, readable in a code
review. On a mismatch the report starts with what changed, layer by layer
(``layer3.1.conv2 (Conv2d): output (1, 256, 14, 14) -> (1, 256, 7, 7); params +1.20 M``),
before syrupy's line diff. Numbers compare within ``atol + rtol * |snapshot|`` (both 0 by
default: exact), which suits statistics snapshots. The class is importable by dotted path, as
pytest-xdist needs: ``pytest_modelhooks.snapshot.ModelSnapshotExtension``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from syrupy.assertion import SnapshotAssertion
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from pytest_modelhooks._torch import syrupy_sanitized_name
from pytest_modelhooks.report.diff import describe_changes, numbers_close
from pytest_modelhooks.report.text import snapshot_text


class ModelSnapshotExtension(SingleFileSnapshotExtension):
    """A syrupy extension storing summaries, sizes and statistics as reviewable text files.

    Numbers compare exactly; :meth:`with_tolerances` gives the extension that compares them
    within tolerances (the ``model_snapshot`` fixture uses it with ``modelhooks_snapshot_rtol``
    and ``_atol``), leaving this class as it is for every other test.

    >>> ModelSnapshotExtension.file_extension
    'txt'
    >>> loose = ModelSnapshotExtension.with_tolerances(rtol=0.01)
    >>> loose().matches(serialized_data="std 1.005", snapshot_data="std 1.0")
    True
    >>> ModelSnapshotExtension.rtol, ModelSnapshotExtension.with_tolerances() is ModelSnapshotExtension
    (0.0, True)
    """

    file_extension = "txt"
    _write_mode = WriteMode.TEXT
    #: tolerances for numbers: ``|now - snapshot| <= atol + rtol * |snapshot|``
    rtol: ClassVar[float] = 0.0
    atol: ClassVar[float] = 0.0

    @classmethod
    def with_tolerances(cls, rtol: float = 0.0, atol: float = 0.0) -> type[ModelSnapshotExtension]:
        """This extension comparing numbers within ``rtol``/``atol``: a subclass made once per
        pair (syrupy takes an extension class and makes its own instance), or this class itself
        when both are 0."""
        if rtol == 0 and atol == 0:
            return cls
        return _tolerant(cls, float(rtol), float(atol))

    def serialize(self, data: Any, **kwargs: Any) -> str:
        return snapshot_text(data)

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
        if serialized_data == snapshot_data:
            return True
        if (self.rtol <= 0 and self.atol <= 0) or not isinstance(serialized_data, str):
            return False
        return isinstance(snapshot_data, str) and numbers_close(
            snapshot_data, serialized_data, self.rtol, self.atol
        )

    @classmethod
    def matches_test_location(cls, *, test_location: Any, snapshot_location: str) -> bool:
        """Also claim the file of a parametrized test whose id held characters a file name
        cannot (``conv/3x3``, ``a:b``): syrupy stores it without them (``conv3x3``), then
        fails to relate the file to its test and warns on every ``--snapshot-update``."""
        if super().matches_test_location(test_location=test_location, snapshot_location=snapshot_location):
            return True
        location = Path(snapshot_location)
        try:  # syrupy's own helpers, where this version has them
            if not test_location.is_item_parametrized or location.parent.name != test_location.basename:
                return False
            if not test_location.matches_snapshot_site(snapshot_location):
                return False
            sanitized = syrupy_sanitized_name(cls, test_location.snapshot_name_parametrized)
        except AttributeError:
            return False
        stem = location.name.removesuffix(f".{cls.file_extension}")
        # the test's own file, or one of its numbered ones (test[a].1.txt), never test[ab]
        return sanitized != test_location.snapshot_name_parametrized and (
            stem == sanitized or stem.startswith(f"{sanitized}.")
        )

    def diff_lines(self, serialized_data: Any, snapshot_data: Any) -> Iterator[str]:
        if snapshot_data == "":  # syrupy's stand-in for a snapshot not written yet
            yield "Write it with: pytest --snapshot-update (then review and commit the .txt file)"
            yield from super().diff_lines(serialized_data, snapshot_data)
            return
        changes = change_report(str(snapshot_data), str(serialized_data))
        if changes:
            self.report_changes(changes)
            yield from changes
            yield ""
        yield from super().diff_lines(serialized_data, snapshot_data)

    def report_changes(self, lines: list[str]) -> None:
        """Called with the layer diff of a failing comparison; the ``model_snapshot`` fixture
        puts it in the test's report, where pytest never truncates it. Nothing here."""


def change_report(old: str, new: str) -> list[str]:
    """The layer diff of two snapshot texts, most important first: a headline counting the
    changes, the changed totals, then one line per layer (see :func:`describe_changes`).

    >>> from torch import nn
    >>> from pytest_modelhooks import model_summary
    >>> from pytest_modelhooks.report.text import snapshot_text
    >>> old = snapshot_text(model_summary(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), (1, 4)))
    >>> new = snapshot_text(model_summary(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)), (1, 4)))
    >>> for line in change_report(old, new)[:3]:
    ...     print(line)
    Changed layers (snapshot -> now): 2 changed
      total params: 58 -> 67 (+9)
      trainable params: 58 -> 67 (+9)
    """
    from pytest_modelhooks.checkpoint.spec import HEADER

    if old.startswith(HEADER + ":") and new.startswith(HEADER + ":"):
        return _state_dict_report(old, new)
    changes = describe_changes(old, new)
    if not changes:
        return []
    layers = [line for line in changes if line[:2] in ("~ ", "+ ", "- ")]
    totals = [line for line in changes if line[:2] not in ("~ ", "+ ", "- ")]
    counts = [
        f"{count} {what}"
        for what, prefix in (("changed", "~ "), ("added", "+ "), ("removed", "- "))
        if (count := sum(line.startswith(prefix) for line in layers))
    ]
    headline = "Changed layers (snapshot -> now): " + (", ".join(counts) or "none; the totals differ")
    return [headline, *("  " + line for line in totals + layers)]


def _state_dict_report(old: str, new: str) -> list[str]:
    """A state-dict snapshot's diff in load_state_dict's words: what loading a checkpoint of
    the snapshot's model into the model now would meet."""
    from pytest_modelhooks.checkpoint.loads import load_changes
    from pytest_modelhooks.checkpoint.spec import StateDictSpec

    lines = load_changes(StateDictSpec.from_text(old), StateDictSpec.from_text(new))
    if not lines:
        return []
    counts: dict[str, int] = {}
    for line in lines:
        what = line.partition(":")[0]
        counts[what] = counts.get(what, 0) + 1
    headline = "A checkpoint of the snapshot's model, loaded now: " + ", ".join(
        f"{count} {what}" for what, count in counts.items()
    )
    return [headline, *("  " + line for line in lines)]


class ModelSnapshotAssertion(SnapshotAssertion):
    """syrupy's snapshot assertion whose repr is one line: a failing test's traceback lists its
    arguments, and the default repr is the whole stored snapshot."""

    def __repr__(self) -> str:
        return f"<model_snapshot {self.test_location.snapshot_name!r}>"


def model_snapshot_assertion(
    snapshot: SnapshotAssertion, extension: type[ModelSnapshotExtension]
) -> ModelSnapshotAssertion:
    """``snapshot.use_extension(extension)`` as a :class:`ModelSnapshotAssertion`: syrupy makes
    every derived assertion with ``self.__class__``, so the one-line repr carries over."""
    assertion = snapshot.use_extension(extension)
    assertion.__class__ = ModelSnapshotAssertion
    return assertion  # type: ignore[return-value]


@functools.cache
def _tolerant(base: type[ModelSnapshotExtension], rtol: float, atol: float) -> type[ModelSnapshotExtension]:
    # the same name and module as the base: syrupy's reports and xdist's pickling see one extension
    attributes = {
        "rtol": rtol,
        "atol": atol,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
    }
    return type(base.__name__, (base,), attributes)
