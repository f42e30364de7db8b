"""FederatedData: one in-memory copy of the (long-tailed) train set, the test set, and each
client's train indices. Training and querying index the same arrays (DESIGN.md §2)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from falkit.config import Config
from falkit.data import partition as partition_mod
from falkit.data.imbalance import long_tail
from falkit.data.sources import ImageDataset, load
from falkit.errors import ConfigError
from falkit.seeding import rng


@dataclass
class FederatedData:
    dataset: ImageDataset  # train split already reduced to the long-tailed subset
    clients: list[np.ndarray]  # per client: sorted indices into dataset.x_train
    source_indices: np.ndarray  # position of each kept train sample in the original split
    # each client's feature-shift transform (partition.shift; falkit.data.shift), or None
    shifts: list[dict[str, object]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes)

    @property
    def num_train(self) -> int:
        return len(self.dataset.y_train)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.dataset.y_train, minlength=self.num_classes)

    def partition_counts(self) -> np.ndarray:
        return partition_mod.partition_counts(self.dataset.y_train, self.clients,
                                              self.num_classes)


def partition_seed(cfg: Config) -> int:
    """The seed of the partition: `partition.seed`, else the run's. (The FairFAL code seeds
    its `dir_balance` with 0 whatever the run seed, while the long-tail subsample follows
    the run seed's NumPy stream: the client × class matrix is fixed, the images vary.)"""
    return cfg.seed if cfg.partition.seed is None else cfg.partition.seed


def build(cfg: Config, dataset: ImageDataset | None = None) -> FederatedData:
    """Load, apply the global long tail (from the run's seed), and partition (from
    `partition.seed`, default the run's seed)."""
    if cfg.partition.method == "sites":
        raise ConfigError("partition.method = sites: every client is a Flower site that holds "
                          "its own data (a SuperNode with data-root); it names such runs and "
                          "cannot be partitioned here")
    ds = dataset if dataset is not None else load(cfg.data.dataset, cfg.data.data_root,
                                                  cfg.data.val_split)
    keep = long_tail(ds.y_train, len(ds.classes), cfg.data.rho, cfg.data.profile,
                     rng(cfg.seed, "long_tail"))
    seed = partition_seed(cfg)
    ds = dataclasses.replace(ds, x_train=ds.x_train[keep].contiguous(), y_train=ds.y_train[keep],
                             site_train=None if ds.site_train is None else ds.site_train[keep])
    p = cfg.partition
    if p.method == "natural":
        clients = natural_clients(cfg, ds)
    else:
        clients = _drawn_clients(cfg, ds, seed)
    clients = [np.sort(np.asarray(c, dtype=np.int64)) for c in clients]
    shifts = None
    if p.shift != "none":  # each client's images through its own transform (feature shift)
        from falkit.data import shift as shift_mod

        x, shifts = shift_mod.shift_clients(ds.x_train, clients, p.shift, p.shift_strength,
                                            seed)
        x_test = (shift_mod.shift_test(ds.x_test, shifts, p.shift, seed) if p.shift_test
                  else ds.x_test)
        ds = dataclasses.replace(ds, x_train=x, x_test=x_test)
    return FederatedData(dataset=ds, clients=clients, source_indices=keep, shifts=shifts)


def natural_clients(cfg: Config, ds: ImageDataset) -> list[np.ndarray]:
    """partition.method = natural: client k holds the (kept) train samples of site k."""
    if ds.site_train is None:
        raise ConfigError(f"partition.method = natural: {cfg.data.dataset} does not say which "
                          "site holds each sample (an npz's site_train array, image folders "
                          "train/<site>/<class>/, a CSV index's site column)")
    sites = ds.sites or []
    if cfg.partition.num_clients != len(sites):
        raise ConfigError(f"partition.method = natural: {cfg.data.dataset} has {len(sites)} "
                          f"sites ({', '.join(sites[:8])}{' ...' if len(sites) > 8 else ''}); "
                          f"set partition.num_clients = {len(sites)}")
    clients = [np.flatnonzero(ds.site_train == k) for k in range(len(sites))]
    empty = [sites[k] for k, c in enumerate(clients) if not len(c)]
    if empty:
        raise ConfigError(f"partition.method = natural: site {empty[0]} keeps no train "
                          "sample after the long tail (data.rho); lower data.rho")
    return clients


def _drawn_clients(cfg: Config, ds: ImageDataset, seed: int) -> list[np.ndarray]:
    """The clients of a drawn partition (partition.method): falkit.data.partition."""
    p = cfg.partition
    options: dict[str, object] = {}
    if p.method in ("dirichlet_balanced", "dirichlet", "dirichlet_flwr"):
        options["alpha"] = p.alpha
    if p.method in ("dirichlet", "dirichlet_flwr"):
        options.update(min_partition_size=p.min_partition_size, self_balancing=p.self_balancing)
    if p.method in ("dirichlet_flwr", "pathological"):
        options["seed"] = seed  # flwr-datasets' own generator, seeded as it is
    if p.method == "shards":
        if p.classes_per_client != 2:  # before the rename, shards read classes_per_client
            raise ConfigError("partition.method = shards takes partition.shards_per_client "
                              "(classes_per_client is pathological's: exactly k classes per "
                              f"client); got classes_per_client = {p.classes_per_client}")
        options["shards_per_client"] = p.shards_per_client
    if p.method == "pathological":
        options["classes_per_client"] = p.classes_per_client
    if p.method == "json":
        options["path"] = p.file
    return partition_mod.make_partition(p.method, ds.y_train, p.num_clients,
                                        rng(seed, "partition"), **options)


def client_budgets(cfg: Config, data: FederatedData) -> list[int]:
    """Per-client per-cycle budget (ALGORITHMS.md §1): FairFAL's int(round(N,-2)*q/K), or
    KAFAL's proportional ceil(q·|pool_k|). The initial labeled set has the same size.
    Impossible budgets are a ConfigError."""
    return budgets_for(cfg, data.num_train, [len(c) for c in data.clients])


def budgets_for(cfg: Config, num_train: int, pool_sizes: list[int]) -> list[int]:
    """`client_budgets` from the sizes alone (falkit.flower's server never sees the pools)."""
    q, k = cfg.budget.fraction, len(pool_sizes)
    if cfg.budget.rule == "fairfal":
        total = round(num_train, -2) * q
        budgets = [int(total / k)] * k
    else:
        budgets = [math.ceil(q * n) for n in pool_sizes]
    cycles = cfg.budget.cycles
    for i, (b, pool) in enumerate(zip(budgets, pool_sizes, strict=True)):
        if b < 1:
            raise ConfigError(f"budget of client {i} is 0 (N={num_train}, "
                              f"q={q:g}, K={k}); raise budget.fraction")
        if b * cycles > pool:
            raise ConfigError(f"impossible budget: client {i} holds {pool} samples but "
                              f"{cycles} cycles x {b} labels need {b * cycles}; lower "
                              "budget.fraction or budget.cycles")
    return budgets
