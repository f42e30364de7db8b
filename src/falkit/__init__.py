"""falkit: federated active learning (FairFAL, FAST and their baselines).

    import falkit
    res = falkit.run("configs/fmnist_lt.toml", preset="quick", strategy="fairfal")
    df = falkit.load_runs("runs/")

(`falkit.api`; imported on first use, so `import falkit` stays light.)"""

__version__ = "0.1.0"
__all__ = ["Result", "load_runs", "run"]


def __getattr__(name: str):
    if name in __all__:
        from falkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'falkit' has no attribute {name!r}")
