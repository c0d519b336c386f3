"""Will an old checkpoint still load: a model's state-dict spec against a checkpoint's (a state
dict, a ``.pt``/``.safetensors`` file, or a stored spec), in the words of
``load_state_dict``: missing, unexpected, shape, dtype, tied. A missing and an unexpected key of
the same shape at the same place are suggested as a rename; a prefix on every key (``module.``
from DistributedDataParallel, ``_orig_mod.`` from ``torch.compile``) is named once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pytest_modelhooks.checkpoint.spec import StateDictSpec, StateEntry, state_dict_spec
from pytest_modelhooks.errors import describe
from pytest_modelhooks.findings import Finding, HealthError, format_findings

__all__ = ["check_loads", "load_changes", "load_problems", "read_checkpoint"]

#: where training scripts keep the model's state dict inside a checkpoint
_NESTED = ("state_dict", "model_state_dict", "model", "module", "net", "ema")
#: prefixes wrappers put on every key
_PREFIXES = ("module.", "_orig_mod.")


def read_checkpoint(checkpoint: Any, *, key: str | None = None) -> StateDictSpec:
    """The spec of a checkpoint: a :class:`StateDictSpec`, a state dict, or a path to a
    ``.pt``/``.pth``/``.bin`` file (read with ``weights_only=True`` and memory-mapped: no
    weight is read), a ``.safetensors`` file (its header only; needs ``safetensors``) or a
    ``.json`` spec (:meth:`StateDictSpec.to_json`). A checkpoint that holds the state dict under
    a key (``{"model": ..., "optimizer": ...}``) is read at ``key``, or at the one of
    ``state_dict``, ``model_state_dict``, ``model``... it has.

    >>> read_checkpoint({"weight": torch.zeros(2, 3)})["weight"].shape
    (2, 3)
    """
    if isinstance(checkpoint, StateDictSpec):
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        return _read_file(Path(checkpoint), key)
    if isinstance(checkpoint, Mapping):
        return StateDictSpec.from_state_dict(_state_of(checkpoint, key, "checkpoint"))
    raise TypeError(
        "checkpoint must be a state dict, a path to a .pt or .safetensors file, or a StateDictSpec, "
        f"got {describe(checkpoint)}"
    )


def _read_file(path: Path, key: str | None) -> StateDictSpec:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file")
    if path.suffix == ".json":
        return StateDictSpec.from_json(path.read_text())
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError:
            raise ImportError(
                f"checkpoint {str(path)!r}: reading .safetensors needs safetensors (pip install safetensors)"
            ) from None
        entries = []
        try:
            with safe_open(str(path), framework="pt") as opened:
                for name in opened.keys():  # noqa: SIM118 (safe_open is no mapping)
                    sliced = opened.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(sliced.get_dtype(), sliced.get_dtype().lower())
                    entries.append(StateEntry(name, "tensor", tuple(sliced.get_shape()), dtype))
        except Exception as error:
            raise ValueError(f"checkpoint {str(path)!r} does not parse as safetensors: {error}") from None
        return StateDictSpec(entries, knows_ties=False)  # a header says nothing of shared storage
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        try:  # an old-format file cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise ValueError(
                f"checkpoint {str(path)!r} does not load with torch.load(weights_only=True): "
                f"{type(error).__name__}: {error}"
            ) from None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds {describe(loaded)}, not a state dict")
    return StateDictSpec.from_state_dict(_state_of(loaded, key, f"checkpoint {str(path)!r}"))


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def _state_of(loaded: Mapping[Any, Any], key: str | None, what: str) -> Mapping[str, Any]:
    if key is not None:
        if key not in loaded or not isinstance(loaded[key], Mapping):
            raise KeyError(
                f"{what} has no state dict at key={key!r}; its keys: {', '.join(map(str, loaded))}"
            )
        return loaded[key]  # type: ignore[no-any-return]
    if any(isinstance(value, torch.Tensor) for value in loaded.values()) or not loaded:
        return loaded
    for name in _NESTED:
        if isinstance(loaded.get(name), Mapping):
            return loaded[name]  # type: ignore[no-any-return]
    raise ValueError(
        f"{what} holds no tensors at its top level and none of {', '.join(_NESTED)}: pass key= "
        f"(its keys: {', '.join(map(str, loaded))})"
    )


def _dtype_of(entry: StateEntry) -> str:
    return entry.dtype or "-"


def _renames(
    missing: list[StateEntry], unexpected: list[StateEntry], model: StateDictSpec, saved: StateDictSpec
) -> dict[str, str]:
    """Missing keys paired with unexpected ones of the same shape and dtype, nearest in
    position first (a renamed submodule keeps its place in the order)."""
    order = {entry.key: index for index, entry in enumerate(model.persistent)}
    saved_order = {entry.key: index for index, entry in enumerate(saved.persistent)}
    pairs: dict[str, str] = {}
    taken: set[str] = set()
    for want in missing:
        candidates = [
            have
            for have in unexpected
            if have.key not in taken
            and have.shape == want.shape
            and have.dtype == want.dtype
            and have.key.rsplit(".", 1)[-1] == want.key.rsplit(".", 1)[-1]
        ]
        if not candidates:
            continue
        best = min(candidates, key=lambda have: abs(saved_order[have.key] - order[want.key]))
        pairs[want.key] = best.key
        taken.add(best.key)
    return pairs


def load_problems(
    model: nn.Module | StateDictSpec,
    checkpoint: Any,
    *,
    strict: bool = True,
    key: str | None = None,
    allow_cast: bool = False,
) -> list[Finding]:
    """What ``model.load_state_dict(checkpoint, strict=strict)`` would do wrong, one
    :class:`~pytest_modelhooks.findings.Finding` per key, in the model's key order: ``missing``
    (the model's key is not in the checkpoint), ``unexpected`` (the checkpoint's key is not in
    the model), ``shape``, ``dtype`` (loads, cast; not a finding with ``allow_cast=True``),
    ``tied``/``untied`` (the model ties two keys the checkpoint holds apart, or the other way).
    With ``strict=False`` a missing key is what would be *silently skipped* (it keeps its
    initial values) and an unexpected one what would be silently ignored; a shape mismatch
    fails either way. Nothing is loaded.

    >>> old = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    >>> new = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    >>> [(f.layer, f.statistic) for f in load_problems(new, old.state_dict())]
    [('1.weight', 'shape'), ('1.bias', 'shape')]
    """
    mine = model if isinstance(model, StateDictSpec) else state_dict_spec(model)
    saved = read_checkpoint(checkpoint, key=key)
    found = _prefixed(mine, saved)
    if found:
        return found
    want = {entry.key: entry for entry in mine.persistent}
    have = {entry.key: entry for entry in saved.persistent}
    missing = [entry for entry in mine.persistent if entry.key not in have]
    unexpected = [entry for entry in saved.persistent if entry.key not in want]
    renames = _renames(missing, unexpected, mine, saved)
    renamed_from = {old: new for new, old in renames.items()}
    for entry in mine.persistent:
        if entry.key not in have:
            found.append(_missing(entry, strict, renames.get(entry.key)))
        else:
            found += _differences(entry, have[entry.key], have, saved.knows_ties, allow_cast)
    for entry in unexpected:
        consequence = "load_state_dict(strict=True) fails" if strict else "silently ignored"
        note = f"unexpected: {entry.key} {entry.shape_text} is in the checkpoint only; {consequence}"
        if entry.key in renamed_from:
            note += f" (renamed to {renamed_from[entry.key]}?)"
        elif entry.key in mine and not mine[entry.key].persistent:
            note += " (the model holds it as a buffer that is not persistent now: neither saved nor loaded)"
        found.append(Finding(entry.key, entry.kind, "unexpected", float("nan"), "in model", None, note))
    return found


def _missing(entry: StateEntry, strict: bool, renamed: str | None) -> Finding:
    consequence = (
        "load_state_dict(strict=True) fails" if strict else "silently skipped: it keeps its initial values"
    )
    note = f"missing: {entry.key} {entry.shape_text} is not in the checkpoint; {consequence}"
    if renamed is not None:
        note += f" (renamed? the checkpoint has {renamed}, of the same shape at the same place)"
    return Finding(entry.key, entry.kind, "missing", float("nan"), "in checkpoint", None, note)


def _differences(
    entry: StateEntry, other: StateEntry, have: dict[str, StateEntry], knows_ties: bool, allow_cast: bool
) -> list[Finding]:
    """What differs between the model's key and the checkpoint's of the same name."""
    found = []
    nan = float("nan")
    if entry.shape != other.shape and entry.shape is not None and other.shape is not None:
        note = (
            f"shape: {entry.key} {other.shape_text} in the checkpoint -> {entry.shape_text} in the "
            "model; load_state_dict fails, strict or not"
        )
        found.append(Finding(entry.key, entry.kind, "shape", nan, other.shape_text, None, note))
    elif entry.dtype != other.dtype and not allow_cast and entry.dtype and other.dtype:
        note = (
            f"dtype: {entry.key} {other.dtype} in the checkpoint -> {entry.dtype} in the model; it "
            "loads, cast (allow_cast=True accepts this)"
        )
        found.append(Finding(entry.key, entry.kind, "dtype", nan, _dtype_of(other), None, note))
    if entry.tied_to is not None and entry.tied_to in have and other.tied_to != entry.tied_to and knows_ties:
        note = (
            f"tied: the model ties {entry.key} to {entry.tied_to}, the checkpoint holds them apart; "
            "loading writes both into one tensor and the later key wins"
        )
        found.append(Finding(entry.key, entry.kind, "tied", nan, "apart", None, note))
    elif other.tied_to is not None and entry.tied_to != other.tied_to:
        note = (
            f"untied: the checkpoint's {entry.key} is tied to {other.tied_to}, the model holds them "
            "apart now: they load equal, then train apart"
        )
        found.append(Finding(entry.key, entry.kind, "untied", nan, f"tied to {other.tied_to}", None, note))
    return found


def _prefixed(mine: StateDictSpec, saved: StateDictSpec) -> list[Finding]:
    """One finding when every key of the checkpoint is the model's with a wrapper's prefix, or
    the other way round, instead of a row per key."""
    want = [entry.key for entry in mine.persistent]
    have = [entry.key for entry in saved.persistent]
    if not want or not have or set(want) & set(have):
        return []
    for prefix in _PREFIXES:
        for one, other, side in ((have, want, "checkpoint"), (want, have, "model")):
            if all(key.startswith(prefix) for key in one) and {key[len(prefix) :] for key in one} == set(
                other
            ):
                origin = "DistributedDataParallel or DataParallel" if prefix == "module." else "torch.compile"
                note = (
                    f"every key of the {side} starts with {prefix!r} (saved from {origin}): strip it, "
                    f"{{k.removeprefix({prefix!r}): v for k, v in state.items()}}, then every key matches"
                )
                return [Finding("", "state dict", "prefix", float(len(one)), "no prefix", None, note)]
    return []


def check_loads(
    model: nn.Module | StateDictSpec,
    checkpoint: Any,
    *,
    strict: bool = True,
    key: str | None = None,
    allow_cast: bool = False,
) -> None:
    """Raise :class:`~pytest_modelhooks.findings.HealthError` when the checkpoint would not load
    into the model as saved (:func:`load_problems`), a row per key.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> check_loads(net, net.state_dict())
    """
    __tracebackhide__ = True
    found = load_problems(model, checkpoint, strict=strict, key=key, allow_cast=allow_cast)
    if found:
        counts: dict[str, int] = {}
        for finding in found:
            counts[finding.statistic] = counts.get(finding.statistic, 0) + 1
        summary = ", ".join(f"{count} {what}" for what, count in counts.items())
        mode = "strict=True" if strict else "strict=False"
        message = f"checkpoint check failed ({mode}): {summary}\n" + format_findings(found, unit="")
        raise HealthError(message, found)


def load_changes(old: StateDictSpec, new: StateDictSpec) -> list[str]:
    """A spec snapshot's diff, as loading a checkpoint of the ``old`` model into the ``new`` one
    would read: ``missing: encoder.norm.weight (64,) (renamed from encoder.ln.weight?)``,
    ``unexpected: ...``, ``shape: head.weight (10, 512) -> (20, 512)``, ``dtype: ...``,
    ``tied: ...``; dtype casts included.

    >>> old = state_dict_spec(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
    >>> new = state_dict_spec(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)))
    >>> load_changes(old, new)
    ['shape: 1.weight (2, 8) -> (3, 8)', 'shape: 1.bias (2,) -> (3,)']
    """
    lines = []
    for finding in load_problems(new, old):
        key = finding.layer
        if finding.statistic == "missing":
            renamed = finding.note.partition("the checkpoint has ")[2].partition(",")[0]
            line = f"missing: {key} {new[key].shape_text}" + (
                f" (renamed from {renamed}?)" if renamed else ""
            )
        elif finding.statistic == "unexpected":
            line = f"unexpected: {key} {old[key].shape_text}"
        elif finding.statistic == "shape":
            line = f"shape: {key} {old[key].shape_text} -> {new[key].shape_text}"
        elif finding.statistic == "dtype":
            line = f"dtype: {key} {old[key].dtype} -> {new[key].dtype}"
        elif finding.statistic in ("tied", "untied"):
            line = f"{finding.statistic}: {key} " + (
                f"now tied to {new[key].tied_to}"
                if finding.statistic == "tied"
                else f"was tied to {old[key].tied_to}"
            )
        else:
            line = f"{finding.statistic}: {finding.note}"
        lines.append(line)
    return lines
