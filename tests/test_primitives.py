"""Selection primitives on hand-made inputs whose answers are known."""

import numpy as np
import torch

from falkit.al.primitives import (
    entropy,
    grad_embeddings,
    kcenter_greedy,
    kmeanspp_seeding,
    margin,
    top_k,
)


def test_top_k_breaks_ties_by_position():
    assert top_k(np.array([0.5, 0.9, 0.5, 0.9, 0.1]), 3).tolist() == [1, 3, 0]


def test_entropy_and_margin_known_values():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.75, 0.25]])
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert torch.allclose(entropy(p), torch.tensor([0.0, np.log(2), h], dtype=torch.float32))
    assert torch.allclose(margin(p), torch.tensor([1.0, 0.0, 0.5]))


def test_grad_embedding_blocks():
    f = torch.tensor([[1.0, 2.0]])
    p = torch.tensor([[0.7, 0.2, 0.1]])
    g = grad_embeddings(f, p)  # ŷ = 0: coefficients (0.3, -0.2, -0.1)
    assert torch.allclose(g, torch.tensor([[0.3, 0.6, -0.2, -0.4, -0.1, -0.2]]))
    g_hot = grad_embeddings(f, p, hot=torch.tensor([2]))
    assert torch.allclose(g_hot[0, 4:], torch.tensor([0.9, 1.8]))


def test_kcenter_on_a_line_with_labeled_center():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    # labeled center at 0: farthest is 11, then the point farthest from {0, 11}: 5 is absent,
    # distances: 0->0, 1->1, 2->2, 10->1 -> pick 2 (position 2)
    assert kcenter_greedy(x, 2, centers=torch.tensor([[0.0]])).tolist() == [4, 2]


def test_kcenter_without_centers_starts_at_first():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    assert kcenter_greedy(x, 2, first=2).tolist() == [2, 1]
    assert kcenter_greedy(x, 3).tolist() == [0, 1, 2]


def test_kmeanspp_first_is_largest_norm_and_distinct():
    rng = np.random.default_rng(0)
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.1, 0.0], [0.0, 0.1], [-4.0, 1.0]])
    picks = kmeanspp_seeding(x, 4, rng)
    assert picks[0] == 1 and len(set(picks.tolist())) == 4


def test_kmeanspp_fills_uniformly_when_all_distances_vanish():
    x = torch.ones(6, 3)
    picks = kmeanspp_seeding(x, 4, np.random.default_rng(1))
    assert picks[0] == 0 and len(set(picks.tolist())) == 4


def test_row_distances_are_bitwise_the_direct_expression_for_any_block_size():
    from falkit.al.primitives import RowDistances

    g = torch.Generator().manual_seed(5)
    # 256-row blocks with a 1-row tail (513, 257) or a ragged one (700); one block (1030 x
    # 64); a 1-row block of 33000 numbers would be summed on two threads in another order
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, d in ((1, 3), (513, 37), (700, 37), (1030, 64), (300, 1281), (257, 33000)):
            x = torch.randn(n, d, generator=g)
            x64 = x.double()
            for budget in (8, 1 << 20):  # the 256-row minimum, the default 1 MiB
                rows = RowDistances(x, buffer_bytes=budget)
                for i in (0, n // 2, n - 1):
                    assert torch.equal(rows.to(i), (x64 - x64[i]).pow(2).sum(1))
    finally:
        torch.set_num_threads(threads)


def test_rank_one_rows_give_the_distances_and_picks_of_the_built_embeddings():
    from falkit.al.primitives import RankOneRows, grad_embedding_factors, grad_embeddings

    g = torch.Generator().manual_seed(3)
    feats = torch.relu(torch.randn(400, 16, generator=g))
    probs = torch.softmax(3 * torch.randn(400, 5, generator=g), 1)
    full = grad_embeddings(feats, probs).double()
    rows = RankOneRows(*grad_embedding_factors(feats, probs))
    assert torch.allclose(rows.sq_norms, full.pow(2).sum(1))
    assert torch.allclose(rows.sq_dists_to(7), (full - full[7]).pow(2).sum(1), atol=1e-9)
    assert rows.sq_dists_to(7)[7] == 0.0  # exactly, not a rounding residue
    for seed in range(5):
        a = kmeanspp_seeding(full, 40, np.random.default_rng(seed))
        b = kmeanspp_seeding(rows, 40, np.random.default_rng(seed))
        assert a.tolist() == b.tolist()


def test_rank_one_rows_zero_duplicates_but_not_near_duplicates():
    from falkit.al.primitives import RankOneRows

    g = torch.Generator().manual_seed(9)
    a = torch.softmax(torch.randn(6, 10, generator=g), 1) - torch.eye(10)[:6]
    b = torch.relu(torch.randn(6, 512, generator=g)) + 0.1
    a[3], b[3] = a[1], b[1]  # row 3 duplicates row 1
    b[5] = b[4] * (1 + 1e-3)  # rows 4 and 5: squared distance 1e-6 of their squared norms
    a[5] = a[4]
    rows = RankOneRows(a, b)
    d1, d4 = rows.sq_dists_to(1), rows.sq_dists_to(4)
    assert d1[1] == 0.0 and d1[3] == 0.0
    full = (a.double().unsqueeze(2) * b.double().unsqueeze(1)).reshape(6, -1)
    assert d4[5] > 0.0 and torch.isclose(d4[5], (full[5] - full[4]).pow(2).sum(), rtol=1e-3)


def test_rank_one_rows_treat_coinciding_rows_as_distance_zero():
    from falkit.al.primitives import RankOneRows

    a = torch.tensor([[0.3, -0.7], [0.3, -0.7], [0.3, -0.7]]).repeat(2, 1)
    b = torch.tensor([[1.1, 2.3, 0.1]]).repeat(6, 1)
    # identical rows: after the first pick the rest are drawn uniformly, as with built rows
    built = (a.unsqueeze(2) * b.unsqueeze(1)).reshape(6, -1)
    for seed in range(3):
        assert (kmeanspp_seeding(RankOneRows(a, b), 4, np.random.default_rng(seed)).tolist()
                == kmeanspp_seeding(built, 4, np.random.default_rng(seed)).tolist())


def test_sq_dists_blocks_rows_and_centers_without_changing_the_answer():
    from falkit.al.primitives import _sq_dists

    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(50, 3, generator=g), torch.randn(7, 3, generator=g)
    exact = ((x[:, None, :].double() - c[None].double()) ** 2).sum(2).min(1).values
    assert torch.allclose(_sq_dists(x, c), exact)
    assert torch.allclose(_sq_dists(x, c, chunk=3, max_block=12), exact)  # 4-row blocks
