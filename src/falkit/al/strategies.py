"""Imports every strategy module of `falkit.al` so that each registers itself: a new
strategy is one new file here (or a plug-in: falkit.registry), found without a list.
`base` (the contract) and `primitives` (shared building blocks) hold no strategy."""

import importlib
import pkgutil

import falkit.al

NOT_STRATEGIES = ("base", "primitives", "strategies")

for _module in sorted(m.name for m in pkgutil.iter_modules(falkit.al.__path__)):
    if _module not in NOT_STRATEGIES:
        importlib.import_module(f"falkit.al.{_module}")
