"""falkit: federated active learning (FairFAL, FAST and their baselines)."""

__version__ = "0.1.0"
