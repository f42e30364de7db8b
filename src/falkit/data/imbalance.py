"""Global class imbalance: subsample a balanced training set into a long tail (FairFAL §1).

Pure numpy functions of a labels array that return sorted int64 index arrays; all randomness
comes from a passed-in ``np.random.Generator``.
"""

from __future__ import annotations

import math

import numpy as np

from falkit.errors import ConfigError

PROFILES = ("exp", "step")


def _check_rho(rho: float | None) -> float:
    """Return rho as a float (None means 1), or raise ConfigError when it is not >= 1."""
    if rho is None:
        return 1.0
    try:
        value = float(rho)
    except (TypeError, ValueError):
        raise ConfigError(f"imbalance.rho must be a number >= 1 (got {rho!r})") from None
    if not math.isfinite(value) or value < 1.0:
        raise ConfigError(f"imbalance.rho must be a finite number >= 1 (n_max / n_min), got {rho}")
    return value


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ConfigError(
            f"imbalance.profile must be one of {', '.join(PROFILES)} (got {profile!r})"
        )


def class_counts_long_tail(
    n_max: int, num_classes: int, rho: float | None, profile: str = "exp"
) -> list[int]:
    """Per-class sample counts of a long tail with head ``n_max`` and imbalance ratio ``rho``.

    ``exp``: class c (0 = head) gets ``int(n_max * (1/rho) ** (c / (C - 1)))``.
    ``step``: classes ``c < C // 2`` get ``n_max``, the others ``int(n_max / rho)``.
    rho None or 1 gives ``n_max`` for every class.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1 (got {num_classes})")
    if n_max < 0:
        raise ConfigError(f"n_max must be >= 0 (got {n_max})")
    _check_profile(profile)
    r = _check_rho(rho)
    if r == 1.0:
        return [int(n_max)] * num_classes
    if profile == "step":
        tail = int(n_max / r)
        return [int(n_max) if c < num_classes // 2 else tail for c in range(num_classes)]
    # A single class has no tail: exponent 0 instead of 0 / 0.
    denom = max(num_classes - 1, 1)
    return [int(n_max * (1.0 / r) ** (c / denom)) for c in range(num_classes)]


def long_tail(
    labels: np.ndarray,
    num_classes: int,
    rho: float | None,
    profile: str = "exp",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Indices (sorted int64) of a long-tailed subset of ``labels``.

    ``n_max = int(N / C)``; class c keeps ``class_counts_long_tail(n_max, C, rho, profile)[c]``
    samples, drawn uniformly without replacement within the class (all of them if the class is
    smaller). rho None or 1 keeps every index. ``rng`` is required (keyword or 5th positional).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError("long_tail needs rng=np.random.Generator (e.g. np.random.default_rng(0))")
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ConfigError("labels must be a 1-D array of integer class ids")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1 (got {num_classes})")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(
            f"labels must lie in [0, {num_classes}); got range [{y.min()}, {y.max()}]"
        )
    _check_profile(profile)
    r = _check_rho(rho)
    if r == 1.0:
        return np.arange(y.size, dtype=np.int64)
    n_max = int(y.size / num_classes)
    targets = class_counts_long_tail(n_max, num_classes, r, profile)
    kept = []
    for c, n_c in enumerate(targets):
        members = np.flatnonzero(y == c)
        if members.size <= n_c:
            kept.append(members)
        else:
            # A seeded uniform draw within the class, so which samples survive is reproducible.
            kept.append(rng.choice(members, size=n_c, replace=False))
    return np.sort(np.concatenate(kept)).astype(np.int64)
