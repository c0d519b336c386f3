"""pytest-modelhooks: test PyTorch model architectures with hooks, shapes and health checks.

The public API is re-exported lazily (PEP 562), so that pytest loading the plugin does not pay
for ``import torch``.

>>> from pytest_modelhooks import model_sizes  # imports torch on first use
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


class StoredOutputChanged(UserWarning):
    """A hook's stored output was changed in place after it was stored (by an in-place op later
    in the forward, such as ``nn.ReLU(inplace=True)``): its values are not what the module
    returned, though its shape is. Defined here, without torch, so that a ``filterwarnings``
    entry naming it costs no ``import torch``."""


_EXPORTS: dict[str, str] = {
    "Hook": "hooks",
    "Hooks": "hooks",
    "HookCallback": "hooks",
    "hook_output": "hooks",
    "hook_outputs": "hooks",
    "count_hooks": "hooks",
    "hooks_by_module": "hooks",
    "select_modules": "hooks",
    "training_flags": "hooks",
    "preserve_training_flags": "hooks",
    "dummy_batch": "shapes",
    "dummy_eval": "shapes",
    "in_channels": "shapes",
    "input_spec": "shapes",
    "model_sizes": "shapes",
    "num_features_model": "shapes",
    "trace_model": "shapes",
    "LayerError": "shapes",
    "LayerSizes": "shapes",
    "model_summary": "summary",
    "ModelSummary": "summary",
    "LayerInfo": "summary",
    "ActivationStats": "stats",
    "GradientStats": "stats",
    "LayerStats": "stats",
    "ParamGradStats": "stats",
    "SteppedOptimizer": "stats",
    "Finding": "checks",
    "HealthError": "checks",
    "batch_leaks": "leaks",
    "causal_leaks": "leaks",
    "check_batch_independence": "leaks",
    "check_causal": "leaks",
    "check_deterministic": "leaks",
    "nondeterministic_layers": "leaks",
}

__all__ = [
    "__version__",
    "StoredOutputChanged",
    "ActivationStats",
    "Finding",
    "GradientStats",
    "HealthError",
    "LayerStats",
    "ParamGradStats",
    "SteppedOptimizer",
    "Hook",
    "HookCallback",
    "Hooks",
    "LayerError",
    "LayerInfo",
    "LayerSizes",
    "ModelSummary",
    "batch_leaks",
    "causal_leaks",
    "check_batch_independence",
    "check_causal",
    "check_deterministic",
    "count_hooks",
    "dummy_batch",
    "dummy_eval",
    "hook_output",
    "hook_outputs",
    "hooks_by_module",
    "in_channels",
    "input_spec",
    "model_sizes",
    "model_summary",
    "nondeterministic_layers",
    "num_features_model",
    "preserve_training_flags",
    "select_modules",
    "trace_model",
    "training_flags",
]

if TYPE_CHECKING:
    from pytest_modelhooks.checks import Finding, HealthError
    from pytest_modelhooks.hooks import (
        Hook,
        HookCallback,
        Hooks,
        count_hooks,
        hook_output,
        hook_outputs,
        hooks_by_module,
        preserve_training_flags,
        select_modules,
        training_flags,
    )
    from pytest_modelhooks.leaks import (
        batch_leaks,
        causal_leaks,
        check_batch_independence,
        check_causal,
        check_deterministic,
        nondeterministic_layers,
    )
    from pytest_modelhooks.shapes import (
        LayerError,
        LayerSizes,
        dummy_batch,
        dummy_eval,
        in_channels,
        input_spec,
        model_sizes,
        num_features_model,
        trace_model,
    )
    from pytest_modelhooks.stats import (
        ActivationStats,
        GradientStats,
        LayerStats,
        ParamGradStats,
        SteppedOptimizer,
    )
    from pytest_modelhooks.summary import LayerInfo, ModelSummary, model_summary


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pytest_modelhooks' has no attribute {name!r}")
    value = getattr(import_module(f"pytest_modelhooks.{module_name}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
