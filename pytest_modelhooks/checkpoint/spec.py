"""What a model's checkpoint holds, as data: every state-dict key with its shape and dtype, whether
it is a parameter or a buffer (persistent or not) and which key it is tied to. Deterministic text,
so that a snapshot of it pins a model's checkpoint format.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pytest_modelhooks.errors import describe, not_a_module
from pytest_modelhooks.findings import text_table

__all__ = ["HEADER", "StateDictSpec", "StateEntry", "state_dict_spec"]

#: the first line of a spec's text, by which a snapshot is known as one
HEADER = "State dict"


@dataclass(frozen=True)
class StateEntry:
    """One key of a state dict.

    ``kind`` is ``"parameter"``, ``"buffer"``, ``"extra"`` (a module's ``get_extra_state``) or
    ``"tensor"`` (read from a checkpoint, where the kind is not recorded); ``persistent`` is
    False for a buffer ``state_dict`` leaves out (``register_buffer(..., persistent=False)``);
    ``tied_to`` the first key holding the same tensor (a tied embedding and head).
    """

    key: str
    kind: str
    shape: tuple[int, ...] | None
    dtype: str | None
    persistent: bool = True
    tied_to: str | None = None

    @property
    def shape_text(self) -> str:
        return (
            "-"
            if self.shape is None
            else "(" + ", ".join(map(str, self.shape)) + ("," if len(self.shape) == 1 else "") + ")"
        )


class StateDictSpec:
    """Every key of a state dict, in ``state_dict()`` order, then the non-persistent buffers.
    ``str()`` is the table a snapshot stores; ``to_json()``/``from_json()`` keep one in a file;
    ``spec["head.weight"]`` is an entry; ``len(spec)`` counts the keys a checkpoint holds.

    >>> spec = state_dict_spec(nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)))
    >>> print(spec)
    State dict: 7 keys, 19 values
    key                    kind       shape   dtype    note
    0.weight               parameter  (2, 4)  float32
    0.bias                 parameter  (2,)    float32
    1.weight               parameter  (2,)    float32
    1.bias                 parameter  (2,)    float32
    1.running_mean         buffer     (2,)    float32
    1.running_var          buffer     (2,)    float32
    1.num_batches_tracked  buffer     ()      int64
    """

    def __init__(self, entries: list[StateEntry], *, knows_ties: bool = True) -> None:
        self.entries = list(entries)
        #: whether a key without ``tied_to`` is known to be apart (not so for a safetensors header)
        self.knows_ties = knows_ties
        self._by_key = {entry.key: entry for entry in self.entries}

    def __iter__(self) -> Iterator[StateEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return sum(entry.persistent for entry in self.entries)

    def __getitem__(self, key: str) -> StateEntry:
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"{key!r} is no key of this state dict") from None

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StateDictSpec):
            return NotImplemented  # a snapshot assertion compares itself
        return self.entries == other.entries

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<StateDictSpec {len(self)} keys>"

    @property
    def persistent(self) -> list[StateEntry]:
        """The entries ``state_dict()`` holds: what a checkpoint has."""
        return [entry for entry in self.entries if entry.persistent]

    def values(self) -> int:
        """How many numbers the checkpoint holds, tied tensors once."""
        return sum(
            int(torch.Size(entry.shape).numel())
            for entry in self.persistent
            if entry.shape is not None and entry.tied_to is None
        )

    def __str__(self) -> str:
        rows = [["key", "kind", "shape", "dtype", "note"]]
        for entry in self.entries:
            notes = []
            if not entry.persistent:
                notes.append("not persistent: not saved")
            if entry.tied_to is not None:
                notes.append(f"tied to {entry.tied_to}")
            rows.append([entry.key, entry.kind, entry.shape_text, entry.dtype or "-", "; ".join(notes)])
        return f"{HEADER}: {len(self)} keys, {self.values():,} values\n" + text_table(rows)

    def to_json(self) -> str:
        """The spec as JSON (a file a later test reads back with :meth:`from_json`)."""
        return json.dumps([asdict(entry) for entry in self.entries], indent=1)

    @classmethod
    def from_json(cls, text: str) -> StateDictSpec:
        try:
            rows = json.loads(text)
            return cls(
                [
                    StateEntry(**{**row, "shape": None if row["shape"] is None else tuple(row["shape"])})
                    for row in rows
                ]
            )
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"not a state-dict spec written by StateDictSpec.to_json: {error}") from None

    @classmethod
    def from_text(cls, text: str) -> StateDictSpec:
        """A spec back from its ``str()`` (a stored snapshot)."""
        lines = text.strip("\n").splitlines()
        if not lines or not lines[0].startswith(HEADER + ":"):
            raise ValueError(f"not a state-dict spec: the text does not start with {HEADER!r}")
        entries = []
        for line in lines[2:]:
            cells = [cell for cell in line.split("  ") if cell.strip()]
            cells = [cell.strip() for cell in cells]
            key, kind, shape, dtype, *rest = cells
            note = rest[0] if rest else ""
            tied = next(
                (part[len("tied to ") :] for part in note.split("; ") if part.startswith("tied to ")), None
            )
            entries.append(
                StateEntry(
                    key,
                    kind,
                    _parse_shape(shape),
                    None if dtype == "-" else dtype,
                    "not persistent" not in note,
                    tied,
                )
            )
        return cls(entries)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> StateDictSpec:
        """The spec of a checkpoint's state dict: kinds unknown (``"tensor"``), ties where two
        keys hold one storage (as ``torch.save`` keeps them)."""
        entries = []
        first_of: dict[Any, str] = {}
        knows_ties = True
        for key, value in state.items():
            if not isinstance(key, str):
                raise ValueError(f"a state dict's keys are strings, got the key {describe(key)}")
            if isinstance(value, torch.Tensor):
                tied = None
                identity = _storage_identity(value)
                knows_ties = knows_ties and identity is not None
                if identity is not None:
                    tied = first_of.setdefault(identity, key)
                    tied = None if tied == key else tied
                entries.append(StateEntry(key, "tensor", tuple(value.shape), _dtype(value.dtype), True, tied))
            else:
                entries.append(StateEntry(key, "extra", None, None))
        return cls(entries, knows_ties=knows_ties)


def _storage_identity(tensor: torch.Tensor) -> Any:
    """What two tensors of one storage share, at the same offset and shape (None: unknown, a
    meta tensor's storage has no address)."""
    if tensor.device.type == "meta":
        return None
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)


def _parse_shape(text: str) -> tuple[int, ...] | None:
    if text == "-":
        return None
    inner = text.strip("()").strip()
    return tuple(int(part) for part in inner.split(",") if part.strip())


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def state_dict_spec(model: nn.Module) -> StateDictSpec:
    """The spec of ``model.state_dict()``: every key with kind, shape, dtype, persistence and tie.
    Nothing runs; a model on the meta device works.

    >>> class Tied(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed = nn.Embedding(10, 4)
    ...         self.head = nn.Linear(4, 10, bias=False)
    ...         self.head.weight = self.embed.weight
    >>> state_dict_spec(Tied())["head.weight"].tied_to
    'embed.weight'
    """
    if not isinstance(model, nn.Module):
        raise not_a_module("model", model)
    state = model.state_dict(keep_vars=True)
    # which object each name holds, duplicates kept: a tied weight is one object under two names
    named: dict[str, Any] = dict(model.named_parameters(remove_duplicate=False))
    buffers: dict[str, Any] = dict(model.named_buffers(remove_duplicate=False))
    first_name: dict[int, str] = {}
    for name, tensor in [*named.items(), *buffers.items()]:
        first_name.setdefault(id(tensor), name)
    entries = []
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            kind = "parameter" if key in named else "buffer" if key in buffers else "tensor"
            first = first_name.get(id(value), key)
            entries.append(
                StateEntry(
                    key, kind, tuple(value.shape), _dtype(value.dtype), True, None if first == key else first
                )
            )
        else:
            entries.append(StateEntry(key, "extra", None, None))
    for name, tensor in buffers.items():
        if name not in state:
            entries.append(StateEntry(name, "buffer", tuple(tensor.shape), _dtype(tensor.dtype), False))
    return StateDictSpec(entries)
