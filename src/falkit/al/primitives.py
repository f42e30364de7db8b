"""Selection primitives: pure functions on arrays, unit-tested on inputs with known answers.

Tensor functions compute on the device of their inputs (every tensor they create is made
there); positions and scores that selection needs as NumPy come back to the CPU."""

from __future__ import annotations

import numpy as np
import torch


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as a NumPy array, from whichever device it is on."""
    return t.detach().cpu().numpy()


def top_k(scores: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Positions of the k largest scores; ties go to the smaller position (ALGORITHMS.md §4)."""
    if isinstance(scores, torch.Tensor):
        scores = as_numpy(scores)
    s = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(s)), -s))  # primary: score desc, secondary: position
    return order[:k]


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -Σ p log p per row, with 0 log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(1)


def margin(p: torch.Tensor) -> torch.Tensor:
    """p(1) - p(2): the gap between the two most probable classes."""
    top2 = p.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def grad_embedding_factors(features: torch.Tensor, probs: torch.Tensor,
                           hot: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of BADGE's rank-one gradient embeddings: g_i = coef_i ⊗ f_i with
    coef_i = 1{c = ŷ_i} − p_i (N × C) and f_i the features (N × D)."""
    if hot is None:
        hot = probs.argmax(1)
    coef = -probs.clone()
    coef[torch.arange(len(coef), device=coef.device), hot.to(coef.device)] += 1.0
    return coef, features


def grad_embeddings(features: torch.Tensor, probs: torch.Tensor,
                    hot: torch.Tensor | None = None) -> torch.Tensor:
    """BADGE gradient embedding (Ash et al. 2020): block c = f(x)·(1{c = ŷ} − p_c), the
    gradient of the cross-entropy w.r.t. the last layer at the hypothesised label ŷ
    (argmax p unless `hot` is given). Shape N × (C·D)."""
    coef, features = grad_embedding_factors(features, probs, hot)
    return (coef.unsqueeze(2) * features.unsqueeze(1)).reshape(len(features), -1)


def _sq_dists(x: torch.Tensor, centers: torch.Tensor, chunk: int = 4096,
              max_block: int = 1 << 25) -> torch.Tensor:
    """min over centers of squared Euclidean distance, for every row of x, in blocks of at
    most `chunk` centers and `max_block` distances (256 MiB of float64): a 100k pool with 5k
    labeled centers needed 3.7 GB in one block. Pools of up to max_block // chunk = 8192
    rows are one row block, as before."""
    out = torch.full((len(x),), float("inf"), dtype=torch.float64, device=x.device)
    if len(centers) == 0:
        return out
    x64 = x.to(torch.float64)
    rows = max(1, max_block // chunk)
    for b in range(0, len(centers), chunk):
        c = centers[b:b + chunk].to(torch.float64)
        for r in range(0, len(x64), rows):
            d = torch.cdist(x64[r:r + rows], c).pow_(2).min(1).values
            out[r:r + rows] = torch.minimum(out[r:r + rows], d)
    return out


class RowDistances:
    """‖x_j − x_i‖² of every row j to one row i, computed as (x_j − x_i)², summed per row —
    bit for bit what `(x - x[i]).pow(2).sum(1)` gives — but in blocks of rows through one
    reused buffer (max(256 rows, `buffer_bytes`)): the full N × D temporaries of that
    expression left the CPU cache (and were page-faulted in afresh) on every pick, 10x
    slower at 100k rows. No block is a single row unless N = 1: torch sums a single long
    row (≥ 32768 numbers) on several threads in another order, but always sums each row of
    a multi-row block on one thread, as it does for the whole matrix."""

    def __init__(self, x: torch.Tensor, buffer_bytes: int = 1 << 20):
        self.x = x.to(torch.float64)
        n, d = self.x.shape
        self.rows = max(256, buffer_bytes // (8 * max(d, 1)))
        self._buf = torch.empty(min(self.rows + 1, n), d, dtype=torch.float64,
                                device=self.x.device)

    def to(self, i: int) -> torch.Tensor:
        x, n, c = self.x, len(self.x), self.x[i]
        out = torch.empty(n, dtype=torch.float64, device=x.device)
        r = 0
        while r < n:
            m = min(self.rows, n - r)
            if n - r - m == 1:  # fold a 1-row tail into this block
                m += 1
            b = torch.sub(x[r:r + m], c, out=self._buf[:m])
            torch.sum(b.pow_(2), 1, out=out[r:r + m])
            r += m
        return out


def kcenter_greedy(x: torch.Tensor, k: int, centers: torch.Tensor | None = None,
                   first: int | None = None) -> np.ndarray:
    """Greedy k-center (Sener & Savarese 2018): repeatedly add the point farthest from its
    nearest center. `centers` (e.g. the labeled points) start the center set; without them
    the first pick is `first` (default: position 0). Returns k distinct positions into x.
    Distances are computed once per pick against the new center only: O(k·N·D)."""
    n = len(x)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    rows = RowDistances(x)
    chosen: list[int] = []
    if centers is not None and len(centers) > 0:
        dist = _sq_dists(rows.x, centers)
    else:
        start = 0 if first is None else int(first)
        chosen.append(start)
        dist = rows.to(start)
    taken = torch.zeros(n, dtype=torch.bool, device=dist.device)
    taken[chosen] = True
    while len(chosen) < k:
        d = dist.masked_fill(taken, -1.0)
        i = int(torch.argmax(d))  # argmax returns the first maximum: ties go to position
        chosen.append(i)
        taken[i] = True
        dist = torch.minimum(dist, rows.to(i))
    return np.asarray(chosen, dtype=np.int64)


class RankOneRows:
    """Rows x_i = a_i ⊗ b_i (flattened outer products, N × (C·D)) kept as their factors:
    squared norms and distances to one row cost O(N·(C + D)) instead of O(N·C·D), since
    ⟨a_i ⊗ b_i, a_j ⊗ b_j⟩ = ⟨a_i, a_j⟩·⟨b_i, b_j⟩. BADGE's gradient embeddings are such rows;
    the product (C·D numbers per row, 1.3 GB for 100k rows at C = 10, D = 128) is never built."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a.to(torch.float64), b.to(torch.float64)
        self.sq_norms = self.a.pow(2).sum(1) * self.b.pow(2).sum(1)

    def __len__(self) -> int:
        return len(self.a)

    def sq_dists_to(self, i: int) -> torch.Tensor:
        """‖x_j − x_i‖² for every j = ‖x_j‖² + ‖x_i‖² − 2⟨a_j, a_i⟩⟨b_j, b_i⟩, clamped at 0.
        Values below the expansion's rounding bound, 4·(C + D)·eps·(‖x_j‖² + ‖x_i‖²) in
        float64 (≈ 5e-13 relative at C + D = 522), count as 0, so coinciding rows stay at
        distance 0 as in the direct computation; rows that far apart are duplicates in
        float32 features anyway."""
        scale = self.sq_norms + self.sq_norms[i]
        d = scale - 2.0 * (self.a @ self.a[i]) * (self.b @ self.b[i])
        return d.masked_fill_(d <= self._tol * scale, 0.0)

    @property
    def _tol(self) -> float:
        return 4 * (self.a.shape[1] + self.b.shape[1]) * torch.finfo(torch.float64).eps


def kmeanspp_seeding(x: torch.Tensor | RankOneRows, k: int,
                     rng: np.random.Generator) -> np.ndarray:
    """BADGE's k-means++ seeding: first center = the largest ‖x‖; each next center drawn
    with probability ∝ squared distance to the nearest chosen center; once every remaining
    distance is 0, the rest are drawn uniformly at random (ALGORITHMS.md §4 badge).
    `x` is a matrix of rows or `RankOneRows` (far faster; exact float64 products, so picks
    can differ from those on float32-built rows where a draw lands within rounding of a
    boundary)."""
    n = len(x)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if isinstance(x, RankOneRows):
        first = int(top_k(x.sq_norms, 1)[0])  # argmax ‖x‖² = argmax ‖x‖
        dist_to = x.sq_dists_to
    else:
        rows = RowDistances(x)
        first = int(top_k(rows.x.norm(dim=1), 1)[0])
        dist_to = rows.to
    chosen = [first]
    taken = np.zeros(n, dtype=bool)
    taken[first] = True
    dist = as_numpy(dist_to(first))
    while len(chosen) < k:
        d = np.where(taken, 0.0, dist)
        total = d.sum()
        if total <= 0:  # all remaining points coincide with a center
            rest = np.flatnonzero(~taken)
            extra = rng.choice(rest, size=k - len(chosen), replace=False)
            chosen.extend(int(i) for i in extra)
            break
        i = int(rng.choice(n, p=d / total))
        chosen.append(i)
        taken[i] = True
        dist = np.minimum(dist, as_numpy(dist_to(i)))
    return np.asarray(chosen, dtype=np.int64)


def class_quotas(budget: int, bucket_sizes: np.ndarray) -> np.ndarray:
    """FairFAL class quotas (ALGORITHMS.md §5 step 3): base = b // C for every class, the
    b mod C remaining go to the classes with the largest buckets (stable order); each quota
    is capped at its bucket size and the leftover is handed out one at a time, round-robin
    over the classes that still have spare candidates, largest buckets first."""
    sizes = np.asarray(bucket_sizes, dtype=np.int64)
    C = len(sizes)
    order = np.argsort(-sizes, kind="stable")  # largest bucket first, ties by class id
    quotas = np.full(C, budget // C, dtype=np.int64)
    quotas[order[: budget % C]] += 1
    leftover = int(np.maximum(quotas - sizes, 0).sum())
    quotas = np.minimum(quotas, sizes)
    while leftover > 0:
        spare = [c for c in order if quotas[c] < sizes[c]]
        if not spare:
            break  # fewer candidates than budget: every candidate is taken
        for c in spare:
            if leftover == 0:
                break
            quotas[c] += 1
            leftover -= 1
    return quotas


def nearest_to_centres(x: np.ndarray, k: int, seed: int, n_init: int = 1) -> np.ndarray:
    """KMeans(k, k-means++, `n_init` runs, random_state `seed`) on x, then the member nearest
    its centre from every non-empty cluster, in cluster order, ties by position (ALFA-Mix's
    and IFAL's selection, ALGORITHMS.md §4). Fewer than k positions come back when k-means
    leaves clusters empty (duplicate points); the caller fills the shortfall."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed)
    with warnings.catch_warnings():
        # duplicate points: sklearn warns about fewer distinct clusters
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = km.fit_predict(x)
    dist = ((x - km.cluster_centers_[labels]) ** 2).sum(1)
    order = np.lexsort((np.arange(len(x)), dist, labels))  # cluster, distance, position
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    return order[first]
