"""Federated optimisation algorithms (ALGORITHMS.md §3), one module each: `base` holds the
contract (`FedAvg`, whose hooks every algorithm may override) and FedAvg itself; every other
module of this package registers its algorithm when imported, and all of them are imported
here, so a new algorithm is one new file (or a plug-in: falkit.registry)."""

import importlib
import pkgutil

from falkit.fl.algorithms.base import (  # noqa: F401  (the package's public names)
    ALGORITHMS,
    Aggregator,
    Client,
    FedAvg,
    State,
    TrainingDiverged,
    check_finite,
    client_weight,
    clone_state,
    create,
    for_config,
    register,
    state_bytes,
    weighted_average,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")
