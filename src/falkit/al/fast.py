"""FAST's selection (ALGORITHMS.md §6; Li, Funk, Wang, Saeed, "FAST: Federated Active
Learning with Foundation Models for Communication-efficient Sampling and Training"), as pure
functions and as a strategy of the one FAL driver.

Pass 1 (preliminary): every client labels a random r0 of its pool (G_k^0); the labeled
embeddings form the bank (shared: uploaded once and redistributed; local: the client's own);
each unlabeled sample gets the majority label of its k nearest bank embeddings (weak label)
and the uncertainty of its class-similarity vector. Pass 2 (refinement): the oracle labels the
b_k most uncertain samples. Then one federated training on human plus weak labels — the
driver's one cycle. `initial_set` and `refine` are one client's two passes; the strategy's
`initial_pass` hooks run them on a client site (`falkit.site`), the same in process and in a
Flower ClientApp; `initial_down` is the server's part between them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from falkit.al.base import Strategy, register
from falkit.al.primitives import top_k
from falkit.config import Config, Names, milestones
from falkit.errors import ConfigError, FalkitError
from falkit.options import Options, option
from falkit.seeding import rng

# fast.uncertainty's choices: entropy (paper) | norm (reference code) | the rest
UNCERTAINTIES = ("entropy", "norm", "least_confidence", "smallest_margin", "largest_margin",
                 "random")
MIB = 2 ** 20


# -- pure primitives ----------------------------------------------------------------------------
def knn_weak_labels(z: np.ndarray, bank_z: np.ndarray, bank_y: np.ndarray, k: int,
                    num_classes: int, chunk: int = 4096) -> np.ndarray:
    """Weak label of every row of `z`: majority vote of its k nearest bank embeddings in L2
    (FAST Alg. 1, preliminary pass; ALGORITHMS.md §6 step 2). Fewer than k neighbours if the
    bank is smaller; equal distances → smaller bank index first; tied votes → smallest class."""
    if len(bank_z) == 0:
        raise ValueError("the labeled embedding bank is empty")
    k = min(k, len(bank_z))
    bank = torch.as_tensor(bank_z, dtype=torch.float64)
    out = np.empty(len(z), dtype=np.int64)
    for b in range(0, len(z), chunk):
        q = torch.as_tensor(z[b:b + chunk], dtype=torch.float64)
        d = torch.cdist(q, bank).numpy()
        nn_idx = np.argsort(d, axis=1, kind="stable")[:, :k]
        votes = np.zeros((len(q), num_classes), dtype=np.int64)
        np.add.at(votes, (np.arange(len(q))[:, None], bank_y[nn_idx]), 1)
        out[b:b + chunk] = votes.argmax(1)  # argmax takes the first maximum: smallest class
    return out


def class_similarity(z: np.ndarray, bank_z: np.ndarray, bank_y: np.ndarray,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """s[i, c] = mean over bank entries j of class c of cos(z_i, z_j) (FAST Eq. 7), for the
    classes present in the bank (returned second; absent classes are excluded, §6 step 3).
    The mean of cosines equals the dot product with the mean of the unit bank vectors."""
    present = np.unique(bank_y)
    present = present[present < num_classes]

    def unit(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    bank_u = unit(bank_z)
    protos = np.stack([bank_u[bank_y == c].mean(0) for c in present])
    return unit(z) @ protos.T, present


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def uncertainty(s: np.ndarray, method: str = "entropy",
                gen: np.random.Generator | None = None) -> np.ndarray:
    """Uncertainty score per row of the similarity matrix `s` (higher = more uncertain).

    * entropy — H(softmax(s_i)) (FAST Eq. 8, the paper's default);
    * norm — ‖s_i − onehot(argmax s_i)‖₂ (the reference code's default, §6 step 4);
    * least_confidence — 1 − max p, p = softmax(s_i);
    * smallest_margin — −(p₍₁₎ − p₍₂₎): a small gap between the top two is uncertain;
    * largest_margin — −(p₍₁₎ − p₍C₎): a small gap between the top and the bottom;
    * random — uniform scores from `gen` (FAST Table VII; Table II ④ random refinement).
    The margins and least confidence use softmax(s) like the entropy (FAST appendix Table VII
    names them without a formula: the standard definitions on the probability vector)."""
    s = np.asarray(s, dtype=np.float64)
    if method == "random":
        if gen is None:
            raise ValueError("uncertainty 'random' needs a numpy Generator")
        return gen.random(len(s))
    if method == "norm":
        onehot = np.zeros_like(s)
        onehot[np.arange(len(s)), s.argmax(1)] = 1.0
        return np.linalg.norm(s - onehot, axis=1)
    p = _softmax(s)
    if method == "entropy":
        return -(p * np.log(np.clip(p, 1e-300, None))).sum(1)
    ps = np.sort(p, axis=1)[:, ::-1]
    if method == "least_confidence":
        return 1.0 - ps[:, 0]
    if method == "smallest_margin":
        return -(ps[:, 0] - ps[:, 1]) if p.shape[1] > 1 else np.zeros(len(p))
    if method == "largest_margin":
        return -(ps[:, 0] - ps[:, -1])
    raise ValueError(f"unknown uncertainty {method!r} (valid: {', '.join(UNCERTAINTIES)})")


def top_uncertain(scores: np.ndarray, b: int) -> np.ndarray:
    """Positions of the b highest scores; equal scores → smaller position first."""
    return np.sort(top_k(scores, max(0, min(b, len(scores)))))


def fraction_count(fraction: float, n: int) -> int:
    """ceil(fraction · n), as KAFAL's proportional budget (ALGORITHMS.md §1), at most n."""
    return min(n, math.ceil(round(fraction * n, 9)))


def refinement_budgets(fraction: float, pools: list[int], split: str) -> list[int]:
    """b_k per client: ceil(fraction · |pool_k|) (`proportional`), or ceil(fraction · N)
    split evenly over the K clients, the first N mod K clients one more (`even`); never more
    than a client's pool."""
    if split == "proportional":
        return [fraction_count(fraction, n) for n in pools]
    total, K = fraction_count(fraction, sum(pools)), len(pools)
    return [min(n, total // K + (1 if k < total % K else 0)) for k, n in enumerate(pools)]


def class_balanced_pick(y: np.ndarray, candidates: np.ndarray, n: int, num_classes: int,
                        gen: np.random.Generator) -> np.ndarray:
    """n samples of `candidates` spread evenly over classes (the reference code's pooled
    initial set): n // C per class, the remainder to the smallest class ids, each class
    capped at what it holds; a seeded uniform draw within each class."""
    picks = []
    for c in range(num_classes):
        members = candidates[y[candidates] == c]
        want = n // num_classes + (1 if c < n % num_classes else 0)
        if want and len(members):
            picks.append(gen.choice(members, size=min(want, len(members)), replace=False))
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


# -- communication (ALGORITHMS.md §7) ------------------------------------------------------------
def model_traffic(model_bytes: int, clients: int, rounds: int) -> dict[str, float]:
    """Per-round model bytes = Σ over participating clients of 2 × state-dict bytes (download
    + upload, ALGORITHMS.md §7); the total over `rounds`, also in MiB (2^20 bytes)."""
    per_round = 2 * model_bytes * clients
    total = per_round * rounds
    return {"model_bytes": model_bytes, "round_bytes": per_round, "total_bytes": total,
            "round_mib": per_round / MIB, "total_mib": total / MIB}


def bank_payloads(bank_sizes: list[int], dim: int, clients: int,
                  emb_itemsize: int = 4, label_itemsize: int = 8) -> list[dict[str, Any]]:
    """FAST's one-off payload (§6 step 2, paper §IV-C): every client uploads its labeled
    embeddings (float32) with their labels (int64) once, the server sends the whole bank to
    every client."""
    entry = dim * emb_itemsize + label_itemsize
    n = sum(bank_sizes)
    return [{"payload": "bank", "direction": "up", "entries": n, "bytes": n * entry},
            {"payload": "bank", "direction": "down", "entries": n * clients,
             "bytes": n * clients * entry}]


# -- one client's two passes ---------------------------------------------------------------
def initial_set(cfg: Config, k: int, pool: np.ndarray) -> np.ndarray:
    """G_k^0: r0 of client k's pool, uniformly at random (FAST Alg. 1 line 1)."""
    n = fraction_count(cfg.fast.initial, len(pool))
    return np.sort(rng(cfg.seed, "fast_initial", k).choice(pool, size=n, replace=False))


def refine(cfg: Config, k: int, pool: np.ndarray, initial: np.ndarray,
           z_of: Callable[[np.ndarray], np.ndarray], bank_z: np.ndarray, bank_y: np.ndarray,
           num_classes: int, budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Client k's passes after G_k^0: (its unlabeled pool U_k, their weak labels (Alg. 1
    line 3), the b_k most uncertain of U_k to refine (Eq. 7, Eq. 8; none when
    `fast.refine` is off)). `z_of(indices)` gives the embeddings of train samples."""
    f = cfg.fast
    unl = np.setdiff1d(pool, initial, assume_unique=True)
    z = z_of(unl)
    weak = knn_weak_labels(z, bank_z, bank_y, f.k, num_classes)
    s, _ = class_similarity(z, bank_z, bank_y, num_classes)
    u = uncertainty(s, f.uncertainty, rng(cfg.seed, "fast_query", k))
    return unl, weak, unl[top_uncertain(u, budget if f.refine else 0)]


def pooled_budget(fraction: float, n: int, unlabeled: int, mode: str = "all") -> int:
    """The pooled pass's refinement count: ceil(fraction · N) over all N samples (`all`),
    or int(fraction · |U_0|) over those left unlabeled by the initial set (`code`:
    FAST-official's `int(query_ratio * len(unlabeled_indices))`)."""
    if mode == "code":
        return min(unlabeled, int(fraction * unlabeled))
    return min(unlabeled, fraction_count(fraction, n))


def embeddings(cfg: Config, ds: Any, splits: tuple[str, ...] = ("train",),
               enc: Any = None) -> tuple[dict[str, np.ndarray], bool]:
    """The encoder's embeddings of the full splits of `ds` (before the long tail, so every
    seed and setting reuses one cache entry); whether all came from the cache."""
    from falkit.models import encoders

    if enc is None:
        enc = encoders.create(cfg.fast.encoder, batch_size=cfg.fast.encode_batch,
                              device=cfg.runtime.device)  # runs on the run's device
    return encoders.embed_splits(enc, ds, splits, cfg.fast.cache_dir)


def weak_row(k: Any, pool: int, initial: int, weak: np.ndarray, truth: np.ndarray,
             queried: np.ndarray) -> dict[str, Any]:
    """Weak-label accuracy of one client before and after refinement (§6 "Report"): over
    the samples that got a weak label (`weak`, their true labels `truth`); `queried`: a
    mask of those the oracle relabeled, so after − before = corrected / n exactly."""
    n, before = len(weak), int((weak == truth).sum())
    corrected = int((weak[queried] != truth[queried]).sum())
    return {"client": k, "pool": pool, "initial": initial, "queried": int(queried.sum()),
            "weak_n": n, "weak_acc_before": round(before / n, 6) if n else None,
            "weak_acc_after": round((before + corrected) / n, 6) if n else None,
            "corrected": corrected, "_before": before}


def weak_rows_total(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The clients' rows and an "all" row over them (the private `_before` counts dropped)."""
    n = sum(r["weak_n"] for r in rows)
    before = sum(r["_before"] for r in rows)
    corrected = sum(r["corrected"] for r in rows)
    out = [{k: v for k, v in r.items() if k != "_before"} for r in rows]
    out.append({"client": "all", "pool": sum(r["pool"] for r in rows),
                "initial": sum(r["initial"] for r in rows),
                "queried": sum(r["queried"] for r in rows), "weak_n": n,
                "weak_acc_before": round(before / n, 6) if n else None,
                "weak_acc_after": round((before + corrected) / n, 6) if n else None,
                "corrected": corrected})
    return out


def training_config(cfg: Config) -> Config:
    """`cfg` with FAST's training recipe over [fl]: `fast.weighting` (FAST Eq. 2: uniform),
    and each of fast.lr, weight_decay, batch_size, lr_milestones, lr_decay_rule that is set
    (`reference`: FAST-official's ablation/ code). The crop (`fast.crop_pad`) is the
    engine inputs' (`Fast.engine_inputs`)."""
    f = cfg.fast
    over: dict[str, Any] = {"weighting": f.weighting}
    for key in ("lr", "weight_decay", "batch_size"):
        if getattr(f, key) is not None:
            over[key] = getattr(f, key)
    if f.lr_milestones.strip():
        over["lr_milestones"] = f.lr_milestones
    if f.lr_decay_rule:
        over["lr_decay_rule"] = f.lr_decay_rule
    out = copy.copy(cfg)  # the method sections shared, [fl] replaced
    out.fl = dataclasses.replace(cfg.fl, **over)
    return out


# -- the strategy -----------------------------------------------------------------------------
@dataclass
class FASTConfig(Options):
    """[fast] FAST (ALGORITHMS.md §6): defaults are the paper's Algorithm 1; `scope =
    "pooled"` is the reference code's behaviour. Table II's components: ① linear probing is
    `model.backbone = "linear"` (a linear head on the embeddings), ② `weak_labels`,
    ③ `refine` (uncertainty refinement), ④ random refinement = `uncertainty = "random"`."""

    # pixels | pca[:dim] | hf:<dir or id> | open_clip:<arch>:<file> | timm:<name>:<file>
    # | torchscript:<file> (falkit.models.encoders)
    encoder: str = "pca"
    # client: per-client passes (Alg. 1) | pooled: the reference code's
    scope: str = option("client", choices=("client", "pooled"))
    # shared: every client's G_k^0 embeddings, redistributed | local
    bank: str = option("shared", choices=("shared", "local"))
    # r0: initial labeled fraction of each client's pool
    initial: float = option(0.01, low=0, high=1, low_in=False, high_in=False)
    # refinement budget b_k = budget x |pool_k| (0, 5, 40, 80 % study)
    budget: float = option(0.05, low=0, high=1, high_in=False)
    # proportional: b_k = budget x |pool_k| | even: budget x N split evenly over the clients
    budget_split: str = option("even", choices=("proportional", "even"))
    # SGD steps per FL round: the paper's tau = 5; 0 = fl.local_epochs epochs (the
    # reference code: 5 local epochs)
    local_steps: int = option(5, low=0)
    k: int = option(10, low=1)  # kNN neighbours of the weak labels
    # entropy (paper) | norm (reference code) | least_confidence | smallest_margin
    # | largest_margin | random
    uncertainty: str = option("entropy", choices=UNCERTAINTIES)
    weak_labels: bool = True  # train on weak labels for the unqueried samples (Table II ②)
    refine: bool = True  # spend the budget on the oracle (Table II ③/④)
    # FAST's training recipe, where it differs from [fl] (None: the [fl] value): FedAvg
    # weights (uniform: FAST Eq. 2 and Algorithm 1 line 25, 1/|K_t| | labeled: each
    # client's training-set size, FAST-official's num_samples), SGD lr, weight decay, batch,
    # random-crop padding (None: the dataset's) and lr milestones (fractions of R)
    weighting: str = option("uniform", choices=("uniform", "labeled"))
    lr: float | None = option(None, low=0, low_in=False)  # SGD lr
    weight_decay: float | None = option(None, low=0)  # SGD weight decay
    batch_size: int | None = option(None, low=2)  # SGD mini-batch
    crop_pad: int | None = option(None, low=0)  # random-crop padding
    lr_milestones: Names = ""  # lr decay points, fractions of the rounds
    # "" = fl.lr_decay_rule
    lr_decay_rule: str = option("", choices=("", "paper", "code", "at"))
    # scope = pooled: the refinement count, all = ceil(budget x N) | code = int(budget x
    # |U_0|), the samples left unlabeled after the initial set (FAST-official data.py)
    pooled_budget: str = option("all", choices=("all", "code"))
    encode_batch: int = option(64, low=1)  # images per encoder forward pass
    cache_dir: str | None = None  # embedding cache; none = $FALKIT_CACHE or ~/.cache/falkit

    def check(self, cfg: Any) -> None:
        if self.initial + self.budget > 1:
            raise ConfigError(f"fast.initial + fast.budget must be <= 1, got "
                              f"{self.initial:g} + {self.budget:g}")
        milestones(self.lr_milestones, "fast.lr_milestones")


@register
class Fast(Strategy):
    """FAST as a strategy of the driver: one cycle, whose cycle-0 labeling is the two passes
    (its `initial_pass` hooks, run by each client site in process and in the Flower
    ClientApps alike), trained on human plus weak labels with τ local SGD steps per round,
    on the images or on the encoder's embeddings (`engine_inputs`)."""

    name = "fast"
    options = FASTConfig  # its section [fast]

    # cycle 0: Alg. 1's preliminary pass (G_k^0 and its bank entries), then its
    # refinement pass (weak labels from the bank, the b_k most uncertain to the oracle)
    initial_passes: ClassVar[tuple[str, ...]] = ("fast_initial", "fast")
    initial_values: ClassVar[tuple[str, ...]] = ("dim", "cached")  # embedding size, cache hit
    # §6 step 2: the labeled embeddings (n × d) with their labels, uploaded once
    initial_uploads: ClassVar[dict[str, dict[str, int]]] = {"bank": {"z": 2, "y": 1}}

    @classmethod
    def check_transport(cls, cfg: Config, transport: str) -> None:
        if transport == "flower" and cfg.fast.scope != "client":
            raise ConfigError("fast.scope = pooled runs FAST's first pass over every client's "
                              "samples in one place; on Flower use fast.scope = client")

    @classmethod
    def check_resources(cls, cfg: Config) -> None:
        from falkit.models import encoders

        encoders.create(cfg.fast.encoder, batch_size=cfg.fast.encode_batch)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.oracle != "simulated":
            raise ConfigError("FAST runs with oracle = simulated (people labeling FAST's two "
                              "passes is not supported yet)")
        if cfg.model.backbone.startswith("frozen:"):
            raise ConfigError("FAST embeds with its own fast.encoder: for its linear probe set "
                              "model.backbone = linear, not a frozen: backbone")
    description = ("FAST: frozen-encoder kNN weak labels and one-shot uncertainty "
                   "refinement, one training")
    per_cycle: ClassVar[bool] = False

    def cycles(self, cfg: Config) -> int:
        return 1

    def target_pct(self, cfg: Config, cycle: int) -> float:
        f = cfg.fast
        return 100 * (f.initial + (f.budget if f.refine else 0.0))

    def local_steps(self, cfg: Config) -> int | None:
        return cfg.fast.local_steps or None  # τ SGD steps, or fl.local_epochs epochs

    def training(self, cfg: Config) -> Config:
        return training_config(cfg)

    def select(self, ctx, budget: int) -> np.ndarray:
        raise RuntimeError("FAST queries once, in its two passes (cycle 0), not per cycle")

    # -- what the engine trains on: the images, or the embeddings (linear probing) --------
    def engine_inputs(self, cfg: Config, full: Any, ds: Any, rows: np.ndarray) -> Any:
        """The frozen encoder's embeddings of the site's train split (rows `rows` of the
        loaded dataset `full`; cached, keyed by encoder and data) for the passes, and what
        the engine trains on: for linear probing (`model.backbone = "linear"`) the
        embeddings as N×D×1×1 float tensors with mean 0 and std 1/255, so the engine's
        normalisation (x/255 − mean)/std is the identity, and no augmentation; else the
        images, with `fast.crop_pad`'s random crop (FAST-official: RandomCrop(padding 4))."""
        import time

        from falkit.site import Inputs, embedding_inputs, image_inputs

        linear = cfg.model.backbone == "linear"
        t = time.perf_counter()
        # the full splits (one cache entry for every seed); under feature shift
        # (partition.shift) the site's own shifted images, as its clients see them
        src = full if cfg.partition.shift == "none" else ds
        z, cached = embeddings(cfg, src, ("train", "test") if linear else ("train",))
        z_train = z["train"][rows] if src is full else z["train"]  # the site's train split
        extras = {"z": z_train, "cached": cached}
        times = {"encode": time.perf_counter() - t}
        if not linear:
            if cfg.fast.crop_pad is not None:
                ds = dataclasses.replace(ds, crop_pad=cfg.fast.crop_pad)
            images = image_inputs(cfg, ds)
            return Inputs(images.train, images.test, extras, times)
        return embedding_inputs(z_train, ds.y_train, z["test"], ds.y_test, extras, times)

    # -- cycle 0: the two passes -----------------------------------------------------------
    def initial_pass(self, cfg: Config, site: Any, p: int, down: Any) -> Any:
        """One client's pass (scope = client): 0 labels G_k^0 (Alg. 1 line 1) and, for the
        shared bank, uploads its embeddings with their labels; 1 gives the rest of the pool
        weak labels from the bank (line 3), has the b_k most uncertain labeled (Eq. 7, 8)
        and trains on human plus weak labels (step 6)."""
        z = site.extras["z"]
        if p == 0:
            picks = initial_set(cfg, site.k, site.pool)
            return self._initial_reply(cfg, site, picks, site.ask(picks, 0),
                                       upload=cfg.fast.bank == "shared")
        initial = site.labeled
        if cfg.fast.bank == "shared":  # every client's G^0, redistributed by the server
            bank_z, bank_y = down.arrays["bank"]["z"], down.arrays["bank"]["y"].astype(np.int64)
        else:
            bank_z, bank_y = z[initial], site.known[initial]
        unl, weak, picks = refine(cfg, site.k, site.pool, initial, z.__getitem__, bank_z,
                                  bank_y, site.num_classes, int(down.values["budget"]))
        return self._refined(cfg, site, initial, unl, weak, picks)

    def central_pass(self, cfg: Config, p: int) -> bool:
        return cfg.fast.scope == "pooled"

    def initial_central(self, cfg: Config, sites: list[Any], p: int) -> dict[int, Any]:
        """scope = pooled, the reference code's passes over the whole training set: a
        class-balanced initial set over every sample (pass 0), then weak labels and the
        most uncertain over everything left (pass 1), each client asking for its own."""
        f = cfg.fast
        C, z, y = sites[0].num_classes, sites[0].extras["z"], sites[0].truth
        owner = np.full(len(z), -1, dtype=np.int64)
        for s in sites:
            owner[s.pool] = s.k
        everyone = np.sort(np.concatenate([s.pool for s in sites]))
        if p == 0:
            g0 = class_balanced_pick(y, everyone, fraction_count(f.initial, len(everyone)), C,
                                     rng(cfg.seed, "fast_initial_pooled"))
            # the bank is counted as if uploaded and redistributed
            return {s.k: self._initial_reply(cfg, s, picks, s.ask(picks, 0), upload=True)
                    for s in sites for picks in [g0[owner[g0] == s.k]]}
        initial = [s.labeled for s in sites]
        bank_idx = np.concatenate(initial)
        bank_y = np.concatenate([s.known[g] for s, g in zip(sites, initial, strict=True)])
        unl = np.setdiff1d(everyone, bank_idx)
        weak = knn_weak_labels(z[unl], z[bank_idx], bank_y, f.k, C)
        sim, _ = class_similarity(z[unl], z[bank_idx], bank_y, C)
        u = uncertainty(sim, f.uncertainty, rng(cfg.seed, "fast_query_pooled"))
        b = pooled_budget(f.budget, len(everyone), len(unl), f.pooled_budget) if f.refine else 0
        pick = unl[top_uncertain(u, b)]
        return {s.k: self._refined(cfg, s, g, unl[owner[unl] == s.k],
                                   weak[owner[unl] == s.k], pick[owner[pick] == s.k])
                for s, g in zip(sites, initial, strict=True)}

    def _initial_reply(self, cfg: Config, site: Any, picks: np.ndarray, labels: np.ndarray,
                       upload: bool) -> Any:
        z = site.extras["z"]
        site.allowed = len(picks)
        reply = site.reply(0, "fast_initial", picks, labels)
        reply.values.update(dim=int(z.shape[1]), cached=int(site.extras["cached"]))
        if upload:
            reply.up["bank"] = {"z": z[picks], "y": labels}
        return reply

    def _refined(self, cfg: Config, site: Any, initial: np.ndarray, unl: np.ndarray,
                 weak: np.ndarray, picks: np.ndarray) -> Any:
        """The refinement's labels (Alg. 1: human labels for the top-b_k) and the client's
        training pool: its human labels and (`fast.weak_labels`) the weak label of every
        other sample of its pool; the weak-label accuracy before and after (simulation)."""
        labels = site.ask(picks, 0)
        site.allowed = len(initial) + len(picks)  # exactly the human labels FAST accounts for
        site.extras["weak"] = (unl, weak)  # (in process: falkit.fast.two_passes reads them)
        if cfg.fast.weak_labels:
            site.reveal(unl, weak)
            site.reveal(picks, labels)  # the human label wins over the weak one
            site.labeled = np.union1d(site.labeled, unl).astype(np.int64)
        reply = site.reply(0, "fast", picks, labels)
        if site.truth is not None:  # §6 "Report": what the refinement corrected
            row = weak_row(site.k, len(site.pool), len(initial), weak, site.truth[unl],
                           np.isin(unl, picks))
            reply.record.update(weak_acc_before=row["weak_acc_before"],
                                weak_acc_after=row["weak_acc_after"])
            reply.diag["weak-row"] = row
        return reply

    def initial_down(self, cfg: Config, p: int, replies: dict[int, Any],
                     pools: dict[int, int]) -> dict[int, Any]:
        """The server after the preliminary pass: the bank of every client's G_k^0 in client
        order (shared bank), and each client's refinement budget b_k."""
        from falkit.site import Down

        f = cfg.fast
        for k, r in replies.items():
            if "bank" in r.up and len(r.up["bank"]["y"]) != int(r.values["labeled"]):
                raise FalkitError(f"client {k} uploaded {len(r.up['bank']['y'])} bank "
                                   f"entries for {int(r.values['labeled'])} labels")
        budgets = dict(zip(sorted(pools), refinement_budgets(
            f.budget, [pools[k] for k in sorted(pools)], f.budget_split), strict=True))
        arrays = {}
        if f.bank == "shared":
            ks = [k for k in sorted(replies) if "bank" in replies[k].up]
            arrays["bank"] = {n: np.concatenate([replies[k].up["bank"][n] for k in ks])
                              for n in ("z", "y")}
        return {k: Down(arrays, {"budget": budgets[k]}) for k in replies}

    def initial_extra(self, cfg: Config, passes: list[dict[int, Any]]) -> dict[str, Any]:
        """For `finish_cycle`: human labels, training-set size, weak-label accuracy per
        client (simulation metrics; else the counts), the bank sizes, the embedding size and
        whether every embedding came from the cache."""
        first, second = passes
        ks = sorted(second)
        if all("weak-row" in second[k].diag for k in ks):
            weak = weak_rows_total([second[k].diag["weak-row"] for k in ks])
        else:
            weak = ([{"client": k, "initial": int(first[k].values["labeled"]),
                      "queried": int(second[k].values["queried"])} for k in ks]
                    + [{"client": "all", "weak_acc_before": None, "weak_acc_after": None}])
        return {"human": sum(int(first[k].values["labeled"]) + int(second[k].values["queried"])
                             for k in ks),
                "trained_on": sum(int(second[k].values["labeled"]) for k in ks),
                "weak_rows": weak,
                "bank_sizes": [len(first[k].up["bank"]["y"]) if "bank" in first[k].up else 0
                               for k in sorted(first)],
                "dim": int(first[min(first)].values["dim"]),
                "cached": all(bool(first[k].values["cached"]) for k in first)}

    def finish_cycle(self, cfg: Config, row: dict[str, Any], extra: dict[str, Any],
                     traffic: list[dict[str, int]], num_train: int
                     ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """FAST's metrics columns (human labels, weak-label accuracy, traffic split, the
        one-off bank) and its files: clients.csv (weak-label accuracy per client) and
        comm.csv (every payload)."""
        weak = extra["weak_rows"]
        overall = weak[-1]
        oneoff = (bank_payloads(extra["bank_sizes"], extra["dim"], len(extra["bank_sizes"]))
                  if any(extra["bank_sizes"]) else [])
        oneoff_bytes = sum(p["bytes"] for p in oneoff)
        down = sum(t["bytes"] for t in traffic)
        last = 2 * traffic[-1]["bytes"] if traffic else 0
        human = extra["human"]
        out: dict[str, Any] = {}
        for key, v in row.items():
            if key == "comm_bytes":
                out.update({"trained_on": extra["trained_on"],
                            "weak_acc_before": overall["weak_acc_before"],
                            "weak_acc_after": overall["weak_acc_after"],
                            "rounds": cfg.fl.rounds, "comm_round_bytes": last,
                            "comm_down_bytes": down, "comm_up_bytes": down})
            out[key] = v
            if key == "comm_mib":
                out.update({"oneoff_bytes": oneoff_bytes,
                            "oneoff_mib": round(oneoff_bytes / MIB, 4),
                            "embedding_dim": extra["dim"],
                            "embeddings_cached": extra["cached"]})
        out["labeled"] = human
        out["labeled_pct"] = round(100 * human / num_train, 4)
        comm_rows = [{"payload": "model", "direction": d, "round": t["round"],
                      "clients": t["clients"], "bytes": t["bytes"],
                      "mib": round(t["bytes"] / MIB, 6)}
                     for t in traffic for d in ("down", "up")]
        comm_rows += [{**p, "round": "one-off", "mib": round(p["bytes"] / MIB, 6)}
                      for p in oneoff]
        return out, {"clients.csv": weak, "comm.csv": comm_rows}


