"""Deep Control: per-filter training statistics for PyTorch networks, and the AGC layer.

Typical use::

    import probe

    with probe.Probe(model, run_dir="runs/my-run") as p:
        for x, y in loader:
            ...
            optimizer.step()
            p.step(loss=loss, lr=optimizer.param_groups[0]["lr"])

    run = probe.open_run("runs/my-run")
    run.filters()  # one row per (step, layer, filter)
"""

import importlib

__version__ = "0.1.0"

# Public names and the submodule that defines each. They are imported on first use, so
# `import probe` stays cheap and a failing optional part does not break the others.
_EXPORTS = {
    "Probe": "probe.probe",
    "open_run": "probe.store",
    "list_runs": "probe.store",
    "Run": "probe.store",
    "AutoGainControl": "probe.agc",
    "AutoGainControlLeakyReLU": "probe.agc",
    "to_agc": "probe.agc",
    "build_model": "probe.models",
    "load_dataset": "probe.data",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
