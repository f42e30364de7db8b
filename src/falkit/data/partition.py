"""Split a labelled training set over federated clients (FairFAL §1 and common baselines).

Every partitioner is a pure numpy function ``f(labels, num_clients, rng, ...)`` that returns one
sorted int64 array of positions into ``labels`` per client. Unless documented otherwise the
arrays are disjoint and together cover every position. Randomness comes only from the
passed-in ``np.random.Generator``.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from falkit.errors import ConfigError

# flwr-datasets' DirichletPartitioner resamples up to this many times before giving up.
DIRICHLET_MAX_ATTEMPTS = 10
# FairFAL partition step 2: number of row/column normalisation rounds.
SINKHORN_ROUNDS = 5


# --------------------------------------------------------------------------- validation


def _check_labels(labels: np.ndarray, num_classes: int | None = None) -> tuple[np.ndarray, int]:
    """Return labels as a 1-D int64 array and the number of classes, or raise ConfigError."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ConfigError("labels must be a non-empty 1-D array of integer class ids")
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"labels must be integer class ids (got dtype {y.dtype})")
    if y.min() < 0:
        raise ConfigError(f"labels must be >= 0 (got {y.min()})")
    c = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.max() >= c:
        raise ConfigError(f"labels must lie in [0, num_classes={c}); got max label {y.max()}")
    return y.astype(np.int64, copy=False), c


def _check_num_clients(num_clients: int, n: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ConfigError(f"partition.num_clients must be an integer (got {num_clients!r})")
    if num_clients < 1 or num_clients > n:
        raise ConfigError(
            f"partition.num_clients must be in [1, {n}] (the number of samples), got {num_clients}"
        )
    return int(num_clients)


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"partition.alpha must be a number > 0 (got {alpha!r})") from None
    if not (a > 0 and math.isfinite(a)):
        raise ConfigError(f"partition.alpha must be > 0 and finite (got {alpha})")
    return a


def _check_rng(rng: np.random.Generator) -> None:
    # A programming error, not a config error: callers must build the Generator from the seed.
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a np.random.Generator, got {type(rng).__name__}")


def _sorted_parts(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


# --------------------------------------------------------------------------- FairFAL balanced


def largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` units proportionally to ``weights`` (int64, sums to ``total``).

    Floor every share, then give the leftover units one each to the largest fractional parts;
    ties go to the lower index (stable sort). All-zero weights are treated as uniform.
    """
    w = np.asarray(weights, dtype=np.float64)
    s = w.sum()
    w = np.full(w.size, 1.0 / w.size) if not s > 0 else w / s
    exact = total * w
    base = np.floor(exact).astype(np.int64)
    # Rounding noise can only make the leftover slightly off; clip it into a valid range.
    left = int(np.clip(total - base.sum(), 0, w.size))
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:left]] += 1
    return base


def rebalance_counts(counts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Move samples between clients until row sums equal ``targets``; column sums are kept.

    The FairFAL authors' repair (partition step 4, their ``dir_balance``), in passes: at the
    start of a pass, receivers are the clients below target (largest deficit first) and donors
    those above it (largest surplus first; ties keep client order). Then for each class
    j = 0..C-1 in index order: every donor that still has surplus offers
    min(its count of j, its surplus); the receivers still short take, in receiver order, from
    the donors with the largest offer first, at most min(offered, demanded) units of class j
    in all. Passes repeat until every client is at its target.
    """
    m = np.array(counts, dtype=np.int64, copy=True)
    q = np.asarray(targets, dtype=np.int64)
    if q.shape != (m.shape[0],) or q.sum() != m.sum():
        raise ValueError("targets must have one entry per client and the same total as counts")
    need = q - m.sum(axis=1)  # > 0: deficit, < 0: surplus
    while need.any():
        receivers = sorted(np.flatnonzero(need > 0), key=lambda i: -need[i])
        donors = sorted(np.flatnonzero(need < 0), key=lambda i: need[i])
        moved = False
        for j in range(m.shape[1]):
            offer = {s: int(min(m[s, j], -need[s])) for s in donors
                     if m[s, j] > 0 and need[s] < 0}
            short = [d for d in receivers if need[d] > 0]
            left = min(sum(offer.values()), int(sum(need[d] for d in short)))
            for d in short:
                for s in sorted(offer, key=lambda s: -offer[s]):  # stable: donor order
                    t = min(offer[s], int(need[d]), left)
                    if t <= 0:
                        continue
                    m[s, j] -= t
                    m[d, j] += t
                    offer[s] -= t
                    need[s] += t
                    need[d] -= t
                    left -= t
                    moved = True
        if not moved:  # unreachable: total surplus equals total deficit
            raise AssertionError("rebalance_counts made no progress")
    return m


def dirichlet_balanced_counts(
    class_counts: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """K x C matrix of samples per (client, class): equal client sizes (± 1), Dirichlet mix.

    FairFAL steps 1-4: P[k] ~ Dir(alpha 1_C); five row-then-column normalisations; each class
    split over clients by largest-remainder rounding of P[:, j]; then ``rebalance_counts`` to the
    targets floor(N/K) (+1 for the first N mod K clients).
    """
    _check_rng(rng)
    a = _check_alpha(alpha)
    n_j = np.asarray(class_counts, dtype=np.int64)
    if n_j.ndim != 1 or n_j.size == 0 or (n_j < 0).any():
        raise ConfigError("class_counts must be a non-empty list of non-negative integers")
    n = int(n_j.sum())
    k = _check_num_clients(num_clients, n)
    c = n_j.size
    # FairFAL partition step 1.
    p = rng.dirichlet(np.full(c, a), size=k)
    # Tiny alpha can underflow a draw to all zeros (or NaN); such a client is treated as uniform.
    bad = ~np.isfinite(p).all(axis=1) | ~(p.sum(axis=1) > 0)
    p[bad] = 1.0 / c
    # FairFAL partition step 2: rows, then columns, five times (ends column-stochastic).
    for _ in range(SINKHORN_ROUNDS):
        p = p / p.sum(axis=1, keepdims=True)
        col = p.sum(axis=0, keepdims=True)
        p = p / np.where(col > 0, col, 1.0)
    # FairFAL partition step 3 (an all-zero column is split uniformly by largest_remainder).
    m = np.stack([largest_remainder(int(n_j[j]), p[:, j]) for j in range(c)], axis=1)
    # FairFAL partition step 4.
    q = np.full(k, n // k, dtype=np.int64)
    q[: n % k] += 1
    return rebalance_counts(m, q)


def dirichlet_balanced(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """FairFAL's default partition: equal client sizes (± 1), class mix ~ Dirichlet(alpha).

    Counts come from ``dirichlet_balanced_counts``; then (step 5) each class's positions are
    shuffled with ``rng`` and cut into consecutive chunks in client order.
    """
    _check_rng(rng)
    y, c = _check_labels(labels, num_classes)
    k = _check_num_clients(num_clients, y.size)
    counts = dirichlet_balanced_counts(np.bincount(y, minlength=c), k, alpha, rng)
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for j in range(c):
        # FairFAL partition step 5.
        members = rng.permutation(np.flatnonzero(y == j))
        for i, chunk in enumerate(np.split(members, np.cumsum(counts[:-1, j]))):
            parts[i].append(chunk)
    return _sorted_parts([np.concatenate(p) for p in parts])


# --------------------------------------------------------------------------- baselines


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_partition_size: int = 10,
    self_balancing: bool = False,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """flwr-datasets ``DirichletPartitioner``: per class, proportions over clients ~ Dir(alpha).

    With ``self_balancing`` a client already holding more than N/K samples gets no more of the
    next classes. The whole draw is repeated (same rng) until every client has at least
    ``min_partition_size`` samples; after ``DIRICHLET_MAX_ATTEMPTS`` failures: ConfigError.
    Client sizes are unequal by design.
    """
    _check_rng(rng)
    a = _check_alpha(alpha)
    y, c = _check_labels(labels, num_classes)
    k = _check_num_clients(num_clients, y.size)
    if min_partition_size < 0:
        raise ConfigError(f"partition.min_partition_size must be >= 0 (got {min_partition_size})")
    if min_partition_size * k > y.size:
        raise ConfigError(
            f"partition.min_partition_size={min_partition_size} x {k} clients exceeds the "
            f"{y.size} samples; lower min_partition_size or num_clients"
        )
    avg = y.size / k
    sizes = np.zeros(k, dtype=np.int64)
    for _ in range(DIRICHLET_MAX_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for j in range(c):
            members = rng.permutation(np.flatnonzero(y == j))
            prop = rng.dirichlet(np.full(k, a))
            if self_balancing:
                # Why: flwr-datasets' balancing; if every client is full keep the raw draw
                # instead of dividing by zero.
                masked = np.where(sizes > avg, 0.0, prop)
                if masked.sum() > 0:
                    prop = masked / masked.sum()
            cuts = np.minimum((np.cumsum(prop) * members.size).astype(np.int64), members.size)
            for i, chunk in enumerate(np.split(members, cuts[:-1])):
                parts[i].append(chunk)
                sizes[i] += chunk.size
        if sizes.min() >= min_partition_size:
            return _sorted_parts([np.concatenate(p) for p in parts])
    raise ConfigError(
        f"dirichlet partition: after {DIRICHLET_MAX_ATTEMPTS} draws some client still had fewer "
        f"than min_partition_size={min_partition_size} samples (last sizes min {sizes.min()}); "
        f"use a larger partition.alpha (got {alpha}) or a smaller min_partition_size"
    )


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation cut into ``num_clients`` near-equal parts (sizes differ by ≤ 1)."""
    _check_rng(rng)
    y, _ = _check_labels(labels)
    k = _check_num_clients(num_clients, y.size)
    return _sorted_parts(np.array_split(rng.permutation(y.size), k))


def shards(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """McMahan et al.'s split: sort by label, cut K·s shards, s random shards per client.

    Order within a class is shuffled first so that which samples form a shard is seeded too.
    A shard may straddle two classes and two shards may share one, so a client holds
    between 1 and 2s classes (s per client only with equal, shard-aligned classes); for
    exactly k classes per client use `pathological`.
    """
    _check_rng(rng)
    y, _ = _check_labels(labels)
    k = _check_num_clients(num_clients, y.size)
    if shards_per_client < 1 or k * shards_per_client > y.size:
        raise ConfigError(
            f"partition.shards_per_client must be >= 1 with num_clients x shards_per_client "
            f"<= {y.size} samples (got {shards_per_client})"
        )
    perm = rng.permutation(y.size)
    order = perm[np.argsort(y[perm], kind="stable")]
    pieces = np.array_split(order, k * shards_per_client)
    owner = rng.permutation(k * shards_per_client).reshape(k, shards_per_client)
    return _sorted_parts([np.concatenate([pieces[s] for s in row]) for row in owner])


def dirichlet_flwr(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    alpha: float,
    seed: int,
    min_partition_size: int = 10,
    self_balancing: bool = False,
) -> list[np.ndarray]:
    """flwr-datasets' `DirichletPartitioner(num_partitions=K, partition_by=label, alpha,
    min_partition_size, self_balancing, seed)`, exactly: its own `default_rng(seed)` (not
    falkit's keyed streams, `rng` is unused), classes in sorted order, each class's samples
    in index order split by the cumulative Dirichlet proportions, the whole draw repeated
    until every client holds `min_partition_size` (at most 11 draws, as flwr-datasets). The
    same index sets as `flwr_datasets` for the same labels and seed (its in-partition
    shuffle only reorders them)."""
    y, _ = _check_labels(labels)
    k = _check_num_clients(num_clients, y.size)
    a = np.full(k, _check_alpha(alpha), dtype=float)
    gen = np.random.default_rng(seed)
    avg = y.size / k
    by_class = [np.nonzero(y == c)[0] for c in np.unique(y)]  # the same for every draw
    for _attempt in range(11):
        parts: list[list[int]] = [[] for _ in range(k)]
        for members in by_class:
            prop = gen.dirichlet(a)
            if self_balancing:
                prop = np.array([0.0 if len(parts[i]) > avg else p for i, p in enumerate(prop)])
                prop = prop / prop.sum()
            cuts = (np.cumsum(prop) * len(members)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(members, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_partition_size:
            return _sorted_parts([np.asarray(p, dtype=np.int64) for p in parts])
    raise ConfigError(
        f"dirichlet_flwr partition: after 11 draws some client still had fewer than "
        f"min_partition_size={min_partition_size} samples (flwr-datasets gives up there too); "
        f"use a larger partition.alpha (got {alpha}) or a smaller min_partition_size")


def pathological(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    classes_per_client: int,
    seed: int,
) -> list[np.ndarray]:
    """Exactly `classes_per_client` classes per client: flwr-datasets'
    `PathologicalPartitioner(num_classes_per_partition=k, class_assignment_mode="random",
    seed)` — each client draws k distinct classes (its own `default_rng(seed)`), each class's
    samples are split evenly (np.array_split, index order) among the clients that drew it.
    A class no client drew is left out (a warning)."""
    y, _ = _check_labels(labels)
    kk = _check_num_clients(num_clients, y.size)
    classes = np.unique(y)
    if not 1 <= classes_per_client <= len(classes):
        raise ConfigError(f"partition.classes_per_client must be in 1..{len(classes)} (the "
                          f"classes present), got {classes_per_client}")
    gen = np.random.default_rng(seed)
    chosen = [gen.choice(classes, size=classes_per_client, replace=False).tolist()
              for _ in range(kk)]
    parts: list[list[int]] = [[] for _ in range(kk)]
    unused = []
    for c in classes:
        owners = [i for i in range(kk) if c in chosen[i]]
        if not owners:
            unused.append(int(c))
            continue
        members = np.nonzero(y == c)[0]
        if len(owners) > len(members):  # as flwr-datasets refuses it
            raise ConfigError(f"pathological partition: class {int(c)} was drawn by "
                              f"{len(owners)} clients but has {len(members)} samples; "
                              "lower num_clients or classes_per_client")
        for i, chunk in zip(owners, np.array_split(members, len(owners)), strict=True):
            parts[i].extend(chunk.tolist())
    if unused:
        import warnings

        warnings.warn(f"pathological partition: classes {unused} were drawn by no client and "
                      "are left out", stacklevel=2)
    return _sorted_parts([np.asarray(p, dtype=np.int64) for p in parts])


def from_json(path: str | Path, n: int) -> list[np.ndarray]:
    """Read a JSON list of per-client index lists and validate it against ``n`` samples.

    Indices must be integers in [0, n) and appear at most once overall. The clients need not
    cover every index (unlisted samples are simply unused); empty clients are allowed.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"partition file {p} does not exist; fix partition.path") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"partition file {p} is not readable JSON: {e}") from None
    if not isinstance(data, list) or not data or not all(isinstance(c, list) for c in data):
        raise ConfigError(f"partition file {p} must hold a non-empty JSON list of index lists")
    seen = np.zeros(n, dtype=bool)
    parts = []
    for i, client in enumerate(data):
        for v in client:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"partition file {p}: client {i} has non-integer index {v!r}")
            if not 0 <= v < n:
                raise ConfigError(f"partition file {p}: client {i} has index {v} outside [0, {n})")
        arr = np.asarray(client, dtype=np.int64)
        if arr.size:
            dup = np.flatnonzero(seen[arr])
            if dup.size == 0:
                dup = np.flatnonzero(np.bincount(arr, minlength=n)[arr] > 1)
            if dup.size:
                raise ConfigError(
                    f"partition file {p}: index {arr[dup[0]]} appears more than once "
                    f"(second time in client {i})"
                )
            seen[arr] = True
        parts.append(arr)
    return _sorted_parts(parts)


def _json_partition(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, path: str | Path
) -> list[np.ndarray]:
    """``from_json`` with the partitioner signature; the file must list ``num_clients`` clients."""
    del rng  # a fixed partition needs no randomness
    n = int(np.asarray(labels).shape[0])
    parts = from_json(path, n)
    if len(parts) != num_clients:
        raise ConfigError(
            f"partition file {path} lists {len(parts)} clients but num_clients={num_clients}; "
            "make them agree"
        )
    return parts


# --------------------------------------------------------------------------- dispatch


PARTITIONERS: dict[str, tuple[Callable[..., list[np.ndarray]], str]] = {
    "dirichlet_balanced": (
        dirichlet_balanced,
        "FairFAL default: equal client sizes, class mix ~ Dirichlet(alpha)",
    ),
    "dirichlet": (
        dirichlet,
        "flwr-datasets DirichletPartitioner: per-class Dirichlet(alpha), unequal sizes",
    ),
    "iid": (iid, "uniformly random, near-equal client sizes"),
    "dirichlet_flwr": (
        dirichlet_flwr,
        "flwr-datasets' DirichletPartitioner exactly (its own seed, the same index sets)",
    ),
    "shards": (shards, "McMahan et al.: label-sorted shards, shards_per_client per client"),
    "pathological": (
        pathological,
        "exactly classes_per_client classes per client (flwr-datasets' Pathological)",
    ),
    "json": (_json_partition, "fixed index lists from a JSON file (option: path)"),
}


def make_partition(
    method: str,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    **options: Any,
) -> list[np.ndarray]:
    """Run the partitioner named ``method`` with its keyword ``options`` (e.g. alpha=0.1)."""
    if method not in PARTITIONERS:
        raise ConfigError(
            f"unknown partition.method {method!r}; choose one of {', '.join(PARTITIONERS)}"
        )
    fn = PARTITIONERS[method][0]
    n = int(np.asarray(labels).shape[0]) if np.ndim(labels) else 0
    _check_num_clients(num_clients, n)
    params = inspect.signature(fn).parameters
    allowed = [p for p in params if p not in ("labels", "num_clients", "rng")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"partition.method={method} does not take option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(allowed) or 'none'}"
        )
    missing = [
        p for p in allowed if params[p].default is inspect.Parameter.empty and p not in options
    ]
    if missing:
        raise ConfigError(f"partition.method={method} needs option(s) {', '.join(missing)}")
    if "alpha" in options:
        _check_alpha(options["alpha"])
    # Keywords, because dirichlet* take alpha before rng (the spec's signatures).
    return fn(labels=labels, num_clients=num_clients, rng=rng, **options)


# --------------------------------------------------------------------------- reporting


def partition_counts(
    labels: np.ndarray, clients: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
    """K x C int64 matrix: samples of each class held by each client."""
    y = np.asarray(labels, dtype=np.int64)
    return np.stack(
        [np.bincount(y[np.asarray(c, dtype=np.int64)], minlength=num_classes) for c in clients]
    ).astype(np.int64)


def _check_table(counts: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    m = np.asarray(counts, dtype=np.int64)
    if m.ndim != 2 or m.shape[1] != len(class_names):
        raise ConfigError(
            f"counts has shape {m.shape} but {len(class_names)} class names were given"
        )
    return m


def write_partition_csv(path: str | Path, counts: np.ndarray, class_names: Sequence[str]) -> None:
    """CSV with header ``client,<class names>,total``, one row per client, then a total row."""
    m = _check_table(counts, class_names)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["client", *class_names, "total"])
        for i, row in enumerate(m):
            w.writerow([i, *row.tolist(), int(row.sum())])
        w.writerow(["total", *m.sum(axis=0).tolist(), int(m.sum())])


def format_partition_table(counts: np.ndarray, class_names: Sequence[str]) -> str:
    """Fixed-width, right-aligned text table of ``counts`` with row and column totals."""
    m = _check_table(counts, class_names)
    header = ["client", *map(str, class_names), "total"]
    rows = [[str(i), *map(str, r.tolist()), str(int(r.sum()))] for i, r in enumerate(m)]
    rows.append(["total", *map(str, m.sum(axis=0).tolist()), str(int(m.sum()))])
    widths = [max(len(r[col]) for r in [header, *rows]) for col in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(w) for cell, w in zip(cells, widths, strict=True))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])
