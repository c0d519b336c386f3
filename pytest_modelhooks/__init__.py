"""pytest-modelhooks: test PyTorch model architectures with hooks, shapes and health checks.

The public API is re-exported lazily (PEP 562), so that pytest loading the plugin does not pay
for ``import torch``.

>>> from pytest_modelhooks import model_sizes  # imports torch on first use
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Every public name and the module that defines it; ``__all__`` is made from it.
_EXPORTS: dict[str, str] = {
    # no torch behind these two: a filterwarnings entry or an except clause naming one is cheap
    "LayerError": "errors",
    "StoredOutputChanged": "errors",
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
    "dummy_batch": "inputs",
    "dummy_eval": "tracing",
    "in_channels": "inputs",
    "input_spec": "inputs",
    "model_sizes": "sizes",
    "num_features_model": "sizes",
    "trace_model": "tracing",
    "LayerSizes": "sizes",
    "model_summary": "summary",
    "ModelSummary": "summary",
    "LayerInfo": "summary",
    "ActivationStats": "stats",
    "GradientStats": "stats",
    "LayerStats": "stats",
    "ParamGradStats": "stats",
    "SteppedOptimizer": "stats",
    "Finding": "findings",
    "HealthError": "findings",
    "batch_leaks": "dependence",
    "causal_leaks": "dependence",
    "check_batch_independence": "dependence",
    "check_causal": "dependence",
    "check_deterministic": "dependence",
    "nondeterministic_layers": "dependence",
    "model_memory": "memory",
    "max_batch_size": "memory",
    "MemoryReport": "memory",
    "LayerMemory": "memory",
    "BatchFit": "memory",
    "graph_breaks": "compile",
    "check_compiles": "compile",
    "recompiles": "compile",
    "check_exportable": "compile",
    "export_problems": "compile",
    "state_dict_spec": "checkpoint",
    "StateDictSpec": "checkpoint",
    "check_loads": "checkpoint",
    "load_problems": "checkpoint",
    "first_divergence": "divergence",
    "check_same": "divergence",
    "fingerprints": "divergence",
    "Fingerprints": "divergence",
    "check_loss_at_init": "training",
    "check_overfits": "training",
    "check_uses_input": "training",
    "input_use": "training",
    "OverfitCurve": "training",
}

__all__ = ["__version__", *_EXPORTS]

# for type checkers and IDEs; at run time __getattr__ imports each on first use
if TYPE_CHECKING:
    from pytest_modelhooks.checkpoint import StateDictSpec as StateDictSpec
    from pytest_modelhooks.checkpoint import check_loads as check_loads
    from pytest_modelhooks.checkpoint import load_problems as load_problems
    from pytest_modelhooks.checkpoint import state_dict_spec as state_dict_spec
    from pytest_modelhooks.compile import check_compiles as check_compiles
    from pytest_modelhooks.compile import check_exportable as check_exportable
    from pytest_modelhooks.compile import export_problems as export_problems
    from pytest_modelhooks.compile import graph_breaks as graph_breaks
    from pytest_modelhooks.compile import recompiles as recompiles
    from pytest_modelhooks.dependence import (
        batch_leaks as batch_leaks,
    )
    from pytest_modelhooks.dependence import (
        causal_leaks as causal_leaks,
    )
    from pytest_modelhooks.dependence import (
        check_batch_independence as check_batch_independence,
    )
    from pytest_modelhooks.dependence import (
        check_causal as check_causal,
    )
    from pytest_modelhooks.dependence import (
        check_deterministic as check_deterministic,
    )
    from pytest_modelhooks.dependence import (
        nondeterministic_layers as nondeterministic_layers,
    )
    from pytest_modelhooks.divergence import Fingerprints as Fingerprints
    from pytest_modelhooks.divergence import check_same as check_same
    from pytest_modelhooks.divergence import fingerprints as fingerprints
    from pytest_modelhooks.divergence import first_divergence as first_divergence
    from pytest_modelhooks.errors import LayerError as LayerError
    from pytest_modelhooks.errors import StoredOutputChanged as StoredOutputChanged
    from pytest_modelhooks.findings import Finding as Finding
    from pytest_modelhooks.findings import HealthError as HealthError
    from pytest_modelhooks.hooks import (
        Hook as Hook,
    )
    from pytest_modelhooks.hooks import (
        HookCallback as HookCallback,
    )
    from pytest_modelhooks.hooks import (
        Hooks as Hooks,
    )
    from pytest_modelhooks.hooks import (
        count_hooks as count_hooks,
    )
    from pytest_modelhooks.hooks import (
        hook_output as hook_output,
    )
    from pytest_modelhooks.hooks import (
        hook_outputs as hook_outputs,
    )
    from pytest_modelhooks.hooks import (
        hooks_by_module as hooks_by_module,
    )
    from pytest_modelhooks.hooks import (
        preserve_training_flags as preserve_training_flags,
    )
    from pytest_modelhooks.hooks import (
        select_modules as select_modules,
    )
    from pytest_modelhooks.hooks import (
        training_flags as training_flags,
    )
    from pytest_modelhooks.inputs import (
        dummy_batch as dummy_batch,
    )
    from pytest_modelhooks.inputs import (
        in_channels as in_channels,
    )
    from pytest_modelhooks.inputs import (
        input_spec as input_spec,
    )
    from pytest_modelhooks.memory import BatchFit as BatchFit
    from pytest_modelhooks.memory import LayerMemory as LayerMemory
    from pytest_modelhooks.memory import MemoryReport as MemoryReport
    from pytest_modelhooks.memory import max_batch_size as max_batch_size
    from pytest_modelhooks.memory import model_memory as model_memory
    from pytest_modelhooks.sizes import (
        LayerSizes as LayerSizes,
    )
    from pytest_modelhooks.sizes import (
        model_sizes as model_sizes,
    )
    from pytest_modelhooks.sizes import (
        num_features_model as num_features_model,
    )
    from pytest_modelhooks.stats import (
        ActivationStats as ActivationStats,
    )
    from pytest_modelhooks.stats import (
        GradientStats as GradientStats,
    )
    from pytest_modelhooks.stats import (
        LayerStats as LayerStats,
    )
    from pytest_modelhooks.stats import (
        ParamGradStats as ParamGradStats,
    )
    from pytest_modelhooks.stats import (
        SteppedOptimizer as SteppedOptimizer,
    )
    from pytest_modelhooks.summary import (
        LayerInfo as LayerInfo,
    )
    from pytest_modelhooks.summary import (
        ModelSummary as ModelSummary,
    )
    from pytest_modelhooks.summary import (
        model_summary as model_summary,
    )
    from pytest_modelhooks.tracing import dummy_eval as dummy_eval
    from pytest_modelhooks.tracing import trace_model as trace_model
    from pytest_modelhooks.training import OverfitCurve as OverfitCurve
    from pytest_modelhooks.training import check_loss_at_init as check_loss_at_init
    from pytest_modelhooks.training import check_overfits as check_overfits
    from pytest_modelhooks.training import check_uses_input as check_uses_input
    from pytest_modelhooks.training import input_use as input_use


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pytest_modelhooks' has no attribute {name!r}")
    value = getattr(import_module(f"pytest_modelhooks.{module_name}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
