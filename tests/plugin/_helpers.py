"""Helpers for the plugin's end-to-end tests."""

from __future__ import annotations

import textwrap

import pytest

MODELS = """
import torch
from torch import nn

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
"""


def write(pytester: pytest.Pytester, name: str, source: str) -> None:
    pytester.makepyfile(**{name: textwrap.dedent(source)})
