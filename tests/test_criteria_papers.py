"""Paper criteria (LRMF, DCT, ICIE, SFP, HRank, CHIP, Taylor) against hand values and direct references."""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch
from models import torch_threads
from torch import nn
from torch.testing import assert_close

from prunecli.criteria import get_criterion, list_criteria
from prunecli.criteria.base import normalise, score_weights, score_with_data
from prunecli.criteria.chip import channel_independence
from prunecli.criteria.dct import dct_energy
from prunecli.criteria.dctbasis import as_maps, dct2, dct_basis, sum_over_images
from prunecli.criteria.hrank import rank_statistic
from prunecli.criteria.icie import feature_capacity, icie_scores, information_capacity, information_independence
from prunecli.criteria.lrmf import lrmf_statistic
from prunecli.criteria.sfp import kernel_dispersion, similarity_scores
from prunecli.criteria.taylor import taylor_gate_scores
from prunecli.errors import PrunecliError
from prunecli.graph import DependencyGraph
from prunecli.samples import resnet20

PAPER_CRITERIA = ("lrmf", "dct", "icie", "sfp", "hrank", "chip", "taylor")


def explicit_dct2(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal 2-D DCT-II of one H x W map by its defining double sum (float64)."""
    height, width = x.shape
    out = torch.zeros(height, width, dtype=torch.float64)
    for u, v in itertools.product(range(height), range(width)):
        cu = math.sqrt((1 if u == 0 else 2) / height)
        cv = math.sqrt((1 if v == 0 else 2) / width)
        total = 0.0
        for h, w in itertools.product(range(height), range(width)):
            total += (
                float(x[h, w])
                * math.cos(math.pi * (2 * h + 1) * u / (2 * height))
                * math.cos(math.pi * (2 * w + 1) * v / (2 * width))
            )
        out[u, v] = cu * cv * total
    return out


# ---------------------------------------------------------------- DCT basis


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_dct_basis_is_orthonormal_and_matches_the_cosine_formula(n):
    basis = dct_basis(n, dtype=torch.float64)
    assert_close(basis @ basis.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    for k, x in itertools.product(range(n), range(n)):
        scale = math.sqrt(1 / n) if k == 0 else math.sqrt(2 / n)
        assert basis[k, x].item() == pytest.approx(scale * math.cos(math.pi * (2 * x + 1) * k / (2 * n)), abs=1e-14)
    assert dct_basis(n, dtype=torch.float64) is basis  # cached per (n, device, dtype)
    assert dct_basis(n).dtype == torch.float32


def test_dct2_matches_the_defining_sum_and_its_low_block_is_the_top_left_corner():
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64)
    full = dct2(x)
    assert_close(full, explicit_dct2(x), atol=1e-12, rtol=0)
    assert_close(dct2(x, 2, 3), full[:2, :3], atol=1e-12, rtol=0)
    assert full[0, 0].item() == pytest.approx(x.sum().item() / math.sqrt(30))  # DC = sum / sqrt(HW)


def test_dct2_matches_scipy_dctn_ortho():
    from scipy import fft
    torch.manual_seed(1)
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    expected = torch.from_numpy(fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1)))
    assert_close(dct2(x), expected, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- DCT energy


def test_dct_full_band_energy_is_the_sum_of_squares_parseval():
    torch.manual_seed(2)
    features = torch.randn(3, 4, 6, 5)
    explicit = dct2(features.double()).pow(2).sum((2, 3)).sum(0)
    assert_close(dct_energy(features, "full"), explicit, rtol=1e-6, atol=0)
    assert_close(dct_energy(features, "full"), features.double().pow(2).sum((0, 2, 3)), rtol=1e-6, atol=0)
    assert dct_energy(torch.full((2, 1, 2, 2), 3.0)).item() == pytest.approx(2 * 4 * 9)


def test_dct_low_band_keeps_low_frequencies_only():
    height = width = 8  # low block: 2 x 2
    basis = dct_basis(8, dtype=torch.float64)
    low_pattern = torch.outer(basis[1], basis[0])  # frequency (1, 0): inside the block, unit energy
    high_pattern = torch.outer(basis[5], basis[2])  # frequency (5, 2): outside the block
    constant = torch.full((height, width), 2.0, dtype=torch.float64)
    features = torch.stack([3 * low_pattern, high_pattern, constant])[None].float()
    assert_close(dct_energy(features, "low"), torch.tensor([9.0, 0.0, 256.0], dtype=torch.float64), atol=1e-5, rtol=1e-6)
    assert_close(dct_energy(features, "full"), torch.tensor([9.0, 1.0, 256.0], dtype=torch.float64), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("band", ["full", "low"])
def test_dct_zero_channel_scores_lowest(band):
    torch.manual_seed(3)
    features = torch.randn(2, 5, 8, 8).relu()
    features[:, 3] = 0
    stat = get_criterion("dct")(dct_band=band).feature_statistic(features)
    assert stat[3].item() == 0
    assert int(stat.argmin()) == 3 and (stat[[0, 1, 2, 4]] > 0).all()


def test_dct_rejects_an_unknown_band():
    with pytest.raises(PrunecliError, match="dct_band"):
        get_criterion("dct")(dct_band="mid")


# ---------------------------------------------------------------- LRMF


def test_lrmf_matches_a_direct_double_loop():
    torch.manual_seed(4)
    features = torch.randn(2, 4, 6, 6)
    block = math.ceil(6 / 4)
    expected = torch.zeros(4, dtype=torch.float64)
    for b in range(2):
        z = [explicit_dct2(features[b, c].double())[:block, :block].flatten() for c in range(4)]
        for i, j in itertools.product(range(4), range(4)):
            expected[i] += math.sqrt(sum((float(p) - float(q)) ** 2 for p, q in zip(z[i], z[j], strict=True)))
    assert_close(lrmf_statistic(features), expected, rtol=1e-5, atol=0)
    assert_close(lrmf_statistic(features, budget=1), expected, rtol=1e-5, atol=0)  # one row per tile
    assert_close(get_criterion("lrmf")().feature_statistic(features), expected, rtol=1e-5, atol=0)


def test_lrmf_non_square_maps_use_a_ceil_quarter_block():
    features = torch.zeros(1, 2, 5, 9)
    features[0, 1, 0, 0] = 1.0  # a delta: its DCT block is D5[:2, 0] x D9[:3, 0]
    d5, d9 = dct_basis(5, dtype=torch.float64), dct_basis(9, dtype=torch.float64)
    distance = torch.outer(d5[:2, 0], d9[:3, 0]).norm().item()
    assert_close(lrmf_statistic(features), torch.tensor([distance, distance], dtype=torch.float64), rtol=1e-6, atol=0)


def test_lrmf_flags_duplicated_channels_as_redundant():
    torch.manual_seed(5)
    features = torch.randn(3, 6, 16, 16)
    features[:, 4] = features[:, 1]
    stat = lrmf_statistic(features)
    assert set(stat.argsort()[:2].tolist()) == {1, 4}


# ---------------------------------------------------------------- ICIE


def test_icie_matches_hand_computed_entropy_and_correlation():
    weight = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 3.0, 3.0]])
    # 4 bins over [0, 3]: 0 -> 0, 1 -> 1, 2 -> 2, 3 -> 3: filters 0 and 1 fill all four bins, filter 2 two.
    assert_close(information_capacity(weight, bins=4), torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64))
    # |corr(0, 1)| = 1, |corr(0, 2)| = |corr(1, 2)| = 6 / (sqrt(5) * 3) = 2 / sqrt(5)
    r = 2 / math.sqrt(5)
    expected_ii = torch.tensor([1 - (1 + r) / 2, 1 - (1 + r) / 2, 1 - r], dtype=torch.float64)
    assert_close(information_independence(weight), expected_ii)
    # minmax(IC) = [1, 1, 0], minmax(II) = [0, 0, 1]
    assert_close(icie_scores(weight, bins=4, lam=0.5), torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64))
    assert_close(icie_scores(weight, bins=4, lam=2.0), torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    icie = get_criterion("icie")(icie_lambda=0.5, icie_bins=4)
    assert_close(icie.weight_scores(weight.reshape(3, 1, 2, 2)), torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64))


def test_icie_defaults_256_bins_and_lambda_one():
    torch.manual_seed(6)
    weight = torch.randn(6, 3, 3, 3)
    assert_close(get_criterion("icie")().weight_scores(weight), icie_scores(weight, bins=256, lam=1.0))


def test_icie_zero_filter_scores_lowest():
    torch.manual_seed(7)
    weight = torch.randn(6, 4, 3, 3)
    weight[2] = 0
    assert information_capacity(weight)[2].item() == 0
    assert information_independence(weight)[2].item() == 0
    scores = get_criterion("icie")().weight_scores(weight)
    assert int(scores.argmin()) == 2 and scores[2].item() == 0


def test_icie_feature_capacity_hand_values():
    # Bins of width 1 on [0, 4]: bins {0, 0, 1, 1}: 1 bit; {0, 0, 0, 0}: 0; {0, 0, 3, 3}: 1 bit; {1, 1, 1, 3}: H(3/4, 1/4).
    images = torch.tensor([[[0.2, 0.7, 1.2, 1.7], [0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 4.0, 4.0], [1.5, 1.5, 1.5, 3.5]]])
    expected = torch.tensor([2.0, -0.75 * math.log2(0.75) - 0.25 * math.log2(0.25)], dtype=torch.float64)
    value_range = (torch.tensor(0.0), torch.tensor(4.0))
    assert_close(feature_capacity(images.reshape(2, 2, 2, 2), value_range, bins=4), expected)


class RecordingICIE(get_criterion("icie")):
    """ICIE in feature mode that keeps what the scorer gave it."""

    def __init__(self, **options):
        super().__init__(icie_capacity="feature", **options)
        self.seen = []

    def feature_statistic(self, features, value_range=None):
        stat = super().feature_statistic(features, value_range)
        self.seen.append((tuple(v.item() for v in value_range), stat))
        return stat


def test_icie_feature_capacity_uses_the_range_of_all_batches():
    # conv1 passes its input through (identity, no bias); its 3 channels are scored where conv2 reads them.
    model = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.ReLU(), nn.Conv2d(3, 1, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3)[:, :, None, None])
    graph = DependencyGraph(model, torch.zeros(1, 3, 2, 2))
    groups = [g for g in graph.groups if g.prunable]
    constant = torch.full((1, 4), 2.0)
    first = torch.cat([torch.tensor([[0.2, 0.7, 1.2, 1.7], [0.0, 0.0, 0.0, 0.0]]), constant]).reshape(1, 3, 2, 2)
    second = torch.cat([torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.5, 1.5, 1.5, 3.5]]), constant]).reshape(1, 3, 2, 2)
    icie = RecordingICIE(icie_bins=4, icie_lambda=0)
    assert icie.needs_data and icie.hook == "activation"
    scores = score_with_data(icie, graph, groups, iter([(first, None), (second, None)]))  # a one-shot iterator
    # The range [0, 4] comes from both batches: the first batch's own [0, 2] would give its first map 2 bits.
    assert [r for r, _ in icie.seen] == [(0.0, 4.0), (0.0, 4.0)]
    assert_close(icie.seen[0][1], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert_close(icie.seen[1][1], torch.tensor([1.0, 0.811278124459, 0.0], dtype=torch.float64))
    mean = torch.tensor([1.0, 0.405639062229, 0.0], dtype=torch.float64)  # lambda 0: min-max of the capacity
    assert_close(scores[groups[0].index], mean / mean.max())


def test_icie_feature_capacity_adds_the_weight_independence():
    torch.manual_seed(17)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 1)).eval()
    graph = DependencyGraph(model, torch.zeros(1, 3, 6, 6))
    groups = [g for g in graph.groups if g.prunable]
    batches = [(torch.randn(2, 3, 6, 6), None)]
    capacity = score_with_data(get_criterion("icie")(icie_capacity="feature", icie_lambda=0), graph, groups, batches)
    fused = score_with_data(get_criterion("icie")(icie_capacity="feature", icie_lambda=2), graph, groups, batches)
    independence = information_independence(model[0].weight.detach())
    minmax = (independence - independence.min()) / (independence.max() - independence.min())
    assert_close(fused[groups[0].index], capacity[groups[0].index] + 2 * minmax)


def test_icie_rejects_bad_options():
    with pytest.raises(PrunecliError, match="icie_bins"):
        get_criterion("icie")(icie_bins=1)
    with pytest.raises(PrunecliError, match="icie_capacity must be one of weight, feature, got 'pixels'"):
        get_criterion("icie")(icie_capacity="pixels")
    with pytest.raises(PrunecliError, match="icie_lambda"):
        get_criterion("icie")(icie_lambda=-1)
    with pytest.raises(PrunecliError, match="icie_lambda"):
        get_criterion("icie")(icie_lambda="a lot")
    with pytest.raises(PrunecliError, match="icie_bins"):
        get_criterion("icie")(icie_bins="2.5")
    icie = get_criterion("icie")(icie_lambda="0.5", icie_bins="4")  # strings, as a command line gives them
    assert (icie.lam, icie.bins) == (0.5, 4)


# ---------------------------------------------------------------- SFP (similarity-based)


def brute_force_cuts(unit: torch.Tensor) -> dict[int, list[set[int]]]:
    """Greedy average linkage from the definition: k -> clusters of the k-cluster cut."""
    dist = (1 - unit @ unit.T).tolist()
    clusters = [{i} for i in range(len(dist))]
    cuts = {len(clusters): [set(c) for c in clusters]}
    while len(clusters) > 1:
        pairs = itertools.combinations(range(len(clusters)), 2)
        a, b = min(
            pairs,
            key=lambda p: sum(dist[i][j] for i in clusters[p[0]] for j in clusters[p[1]])
            / (len(clusters[p[0]]) * len(clusters[p[1]])),
        )
        clusters[a] |= clusters.pop(b)
        cuts[len(clusters)] = [set(c) for c in clusters]
    return cuts


def kept_by_cut(clusters: list[set[int]], norms: list[float]) -> set[int]:
    return {max(c, key=lambda i: norms[i]) for c in clusters}


def top(scores: torch.Tensor, k: int) -> set[int]:
    return set(scores.argsort(descending=True)[:k].tolist())


def test_sfp_top_k_is_one_representative_per_cluster_for_every_k():
    torch.manual_seed(8)
    centres = torch.randn(3, 12)
    weight = torch.cat([centres[i] + 0.4 * torch.randn(4, 12) for i in range(3)]) * torch.rand(12, 1).add(0.5)
    weight = weight.reshape(12, 3, 2, 2)
    scores = similarity_scores(weight)
    assert sorted(scores.tolist()) == list(range(1, 13))
    flat = weight.flatten(1).double()
    unit = flat / flat.norm(dim=1, keepdim=True)
    norms = flat.abs().sum(1).tolist()
    for k, clusters in brute_force_cuts(unit).items():
        assert top(scores, k) == kept_by_cut(clusters, norms), k
    assert top(scores, 3) == kept_by_cut(brute_force_cuts(unit)[3], norms)
    l2 = get_criterion("sfp")(sfp_norm=2).weight_scores(weight)
    norms2 = flat.norm(dim=1).tolist()
    for k, clusters in brute_force_cuts(unit).items():
        assert top(l2, k) == kept_by_cut(clusters, norms2), k


def test_sfp_matches_scipy_average_linkage_cuts():
    from scipy.cluster import hierarchy
    from scipy.spatial import distance
    torch.manual_seed(9)
    weight = torch.randn(60, 8, 3, 3)
    scores = get_criterion("sfp")().weight_scores(weight)
    flat = weight.flatten(1).double()
    norms = flat.abs().sum(1).tolist()
    tree = hierarchy.linkage(distance.pdist(flat.numpy(), metric="cosine"), method="average")
    for k in range(1, 61):
        labels = hierarchy.cut_tree(tree, n_clusters=k).ravel()  # one k per call: a list mis-cuts k = n
        clusters = [set((labels == c).nonzero()[0].tolist()) for c in set(labels.tolist())]
        assert top(scores, k) == kept_by_cut(clusters, norms), k


def test_sfp_flags_a_scaled_duplicate_as_redundant():
    torch.manual_seed(10)
    weight = torch.randn(7, 4, 3, 3)
    weight[6] = 0.5 * weight[2]  # same direction, smaller norm: the redundant copy
    scores = get_criterion("sfp")().weight_scores(weight)
    assert int(scores.argmin()) == 6 and scores[6].item() == 1
    assert 2 in top(scores, 6)


def test_sfp_rejects_a_bad_norm():
    with pytest.raises(PrunecliError, match="sfp_norm"):
        get_criterion("sfp")(sfp_norm=3)
    assert get_criterion("sfp")(sfp_norm="2").norm == 2


def test_kernel_dispersion_hand_values():
    e1, e2 = torch.eye(2)
    assert kernel_dispersion(torch.stack([e1, 3 * e1, 0.5 * e1])) == pytest.approx(0.0, abs=1e-12)
    assert kernel_dispersion(torch.stack([e1, 2 * e2])) == pytest.approx(1 - 1 / math.sqrt(2))
    assert kernel_dispersion(torch.stack([e1, -e1])) == pytest.approx(1.0)  # no mean direction
    # mean of (e1, e1, e2) = (2/3, 1/3): cosines 2/sqrt(5), 2/sqrt(5), 1/sqrt(5)
    assert kernel_dispersion(torch.stack([e1, 5 * e1, e2]).reshape(3, 1, 2, 1)) == pytest.approx(1 - math.sqrt(5) / 3)


# ---------------------------------------------------------------- HRank


@torch_threads(3)
def test_sum_over_images_splits_the_batch_across_threads_and_restores_the_setting():
    seen = []

    def statistic(chunk):
        seen.append((len(chunk), threading.get_ident(), torch.get_num_threads()))
        return chunk.sum(0)

    maps = torch.arange(7 * 2, dtype=torch.float64).reshape(7, 2)
    assert_close(sum_over_images(statistic, maps, per_image=2), maps.sum(0))
    assert sorted(size for size, _, _ in seen) == [1, 3, 3]  # ceil(7 / 3) images per chunk
    assert {threads for _, _, threads in seen} == {1} and threading.get_ident() not in {t for _, t, _ in seen}
    assert torch.get_num_threads() == 3
    seen.clear()
    sum_over_images(statistic, maps, per_image=2, budget=3 * 4)  # budget / 3 threads = 2 images of 2 elements
    assert sorted(size for size, _, _ in seen) == [1, 2, 2, 2]


@torch_threads(3)
def test_chip_and_hrank_give_the_same_scores_on_one_thread_and_on_three():
    torch.manual_seed(14)
    features = torch.randn(5, 6, 4, 4).relu()
    threaded = channel_independence(features), rank_statistic(features)
    torch.set_num_threads(1)
    assert_close(channel_independence(features), threaded[0], rtol=1e-12, atol=0)
    assert_close(rank_statistic(features), threaded[1], rtol=0, atol=0)


def test_hrank_matches_per_map_matrix_rank():
    torch.manual_seed(11)
    maps = torch.zeros(3, 4, 6, 5)
    for b, c in itertools.product(range(3), range(4)):
        r = (b + c) % 5
        maps[b, c] = torch.randn(6, r) @ torch.randn(r, 5)
    expected = torch.zeros(4, dtype=torch.float64)
    for b, c in itertools.product(range(3), range(4)):
        expected[c] += torch.linalg.matrix_rank(maps[b, c]).item()
    assert expected.tolist() == [3.0, 6.0, 9.0, 7.0]  # ranks (b + c) % 5 summed over b
    assert_close(rank_statistic(maps), expected)
    assert_close(rank_statistic(maps, budget=1), expected)
    assert_close(get_criterion("hrank")().feature_statistic(maps), expected)


def test_hrank_hand_values():
    maps = torch.stack([torch.zeros(4, 4), torch.ones(4, 4), torch.eye(4)])[None]
    assert rank_statistic(maps).tolist() == [0.0, 1.0, 4.0]


# ---------------------------------------------------------------- CHIP


def nuclear_norm_reference(features: torch.Tensor) -> torch.Tensor:
    """CHIP by its definition: one explicit SVD per image and per removed channel."""
    f = features.flatten(2).double()
    batch, n, _ = f.shape
    out = torch.zeros(n, dtype=torch.float64)
    for b in range(batch):
        full = torch.linalg.matrix_norm(f[b], ord="nuc")
        for i in range(n):
            reduced = f[b].clone()
            reduced[i] = 0
            out[i] += full - torch.linalg.matrix_norm(reduced, ord="nuc")
    return out


def low_rank_maps(batch: int, n: int, rank: int, height: int, width: int) -> torch.Tensor:
    """Maps of an exact rank: small integer factors, so the product has no rounding."""
    left = torch.randint(-3, 4, (batch, n, rank)).float()
    right = torch.randint(-3, 4, (batch, rank, height * width)).float()
    return (left @ right).reshape(batch, n, height, width)


CHIP_CASES = {
    "HW < n": lambda: torch.randn(2, 12, 2, 2).relu(),
    "HW > n": lambda: torch.randn(2, 6, 4, 4).relu(),
    "HW == n": lambda: torch.randn(3, 9, 3, 3).relu(),
    "rank-deficient, HW > n": lambda: low_rank_maps(2, 8, 3, 5, 5),
    "rank-deficient, HW < n": lambda: low_rank_maps(2, 20, 2, 3, 3),
    "zero channels and a zero image": lambda: torch.cat([torch.randn(2, 4, 3, 3), torch.zeros(2, 2, 3, 3)], 1)
    * torch.tensor([1.0, 0.0])[:, None, None, None],
    "a channel on its own pixel, HW < n": lambda: torch.cat(
        [torch.randn(1, 10, 4) * torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([[[0.0, 0.0, 0.0, 1e-3]]])], 1
    ).reshape(1, 11, 2, 2),
    "large scale": lambda: torch.randn(2, 7, 3, 3) * 1e4,
    "a tiny channel": lambda: torch.cat([torch.randn(1, 5, 4, 4), 1e-6 * torch.randn(1, 1, 4, 4)], 1),
}


@pytest.mark.parametrize("case", CHIP_CASES)
def test_chip_matches_explicit_nuclear_norms(case):
    torch.manual_seed(12)
    features = CHIP_CASES[case]()
    expected = nuclear_norm_reference(features)
    atol = 1e-12 * torch.linalg.matrix_norm(features.flatten(2).double(), ord=2).max().item()  # float64 rounding
    assert_close(channel_independence(features), expected, rtol=1e-9, atol=atol)
    assert_close(channel_independence(features, budget=1), expected, rtol=1e-9, atol=atol)  # one image per chunk
    assert_close(get_criterion("chip")().feature_statistic(features), expected, rtol=1e-9, atol=atol)


def test_chip_hand_values():
    # Orthogonal rows: the nuclear norm is the sum of the row norms, so CI_i = ||f_i||; a zero row scores 0.
    features = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 3, 2, 2)
    assert_close(channel_independence(features), torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64), atol=1e-9, rtol=0)


# ---------------------------------------------------------------- Taylor


class GateNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.pool(self.bn(self.conv(x))).flatten(1))


def hand_taylor(model: GateNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(gamma dL/dgamma + beta dL/dbeta)^2 from the chain rule, with BN on its running statistics."""
    bn = model.bn
    conv = nn.functional.conv2d(x.double(), model.conv.weight.double(), padding=1)
    xhat = (conv - bn.running_mean.double()[:, None, None]) / torch.sqrt(bn.running_var.double() + bn.eps)[:, None, None]
    mean_xhat = xhat.mean((2, 3))  # [B, 3]
    gamma, beta = bn.weight.double(), bn.bias.double()
    pooled = gamma * mean_xhat + beta
    logits = pooled @ model.fc.weight.double().T + model.fc.bias.double()
    delta = (logits.softmax(1) - nn.functional.one_hot(y, 4).double()) / len(x)  # dL/dlogits, mean loss
    d_pooled = delta @ model.fc.weight.double()  # [B, 3]
    d_gamma = (d_pooled * mean_xhat).sum(0)
    d_beta = d_pooled.sum(0)
    return (gamma * d_gamma + beta * d_beta) ** 2


def make_gate_net() -> GateNet:
    torch.manual_seed(13)
    model = GateNet().eval()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([1.5, -0.5, 0.8]))
        model.bn.bias.copy_(torch.tensor([0.2, 0.3, -0.7]))
        model.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.05]))
        model.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.2]))
    return model


def test_taylor_matches_the_hand_computed_gradient_formula():
    model = make_gate_net()
    x, y = torch.randn(6, 1, 5, 5), torch.tensor([0, 1, 2, 3, 1, 0])
    taylor = get_criterion("taylor")()
    total = torch.zeros(3, dtype=torch.float64)
    expected = torch.zeros(3, dtype=torch.float64)
    for part in (slice(0, 3), slice(3, 6)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        total += taylor.gradient_statistic(model.bn, torch.tensor([0, 1, 2]))
        expected += hand_taylor(model, x[part], y[part])
    assert_close(total, expected, rtol=1e-5, atol=1e-12)
    last_batch = hand_taylor(model, x[3:], y[3:])
    assert_close(taylor_gate_scores(model.bn, torch.tensor([2, 0])), last_batch[[2, 0]], rtol=1e-5, atol=1e-12)
    # Through the streaming pass: one BN-gate member per group, normalised to mean 1.
    graph = DependencyGraph(model, x[:1])
    groups = [g for g in graph.groups if g.prunable]
    scores = score_with_data(taylor, graph, groups, [(x[:3], y[:3]), (x[3:], y[3:])])
    assert list(scores) == [groups[0].index] and groups[0].root == "conv"
    assert_close(scores[groups[0].index], normalise(expected / 6), rtol=1e-5, atol=1e-9)


def test_taylor_pass_differentiates_only_the_gates_and_restores_requires_grad():
    """The backward pass skips the weight gradients it does not need; a frozen model scores the same."""
    model = make_gate_net()
    x, y = torch.randn(6, 1, 5, 5), torch.tensor([0, 1, 2, 3, 1, 0])
    graph = DependencyGraph(model, x[:1])
    groups = [g for g in graph.groups if g.prunable]
    seen = []
    model.fc.register_full_backward_hook(lambda *_: seen.append(model.fc.weight.requires_grad))
    model.conv.weight.register_hook(lambda grad: seen.append("conv weight gradient"))
    taylor = get_criterion("taylor")()
    trainable = score_with_data(taylor, graph, groups, [(x, y)])
    assert seen == [False]  # fc's input gradient is computed, its weight's and the conv's are not
    assert all(p.requires_grad for p in model.parameters())
    model.requires_grad_(False)
    frozen = score_with_data(taylor, graph, groups, [(x, y)])
    assert_close(frozen[groups[0].index], trainable[groups[0].index], rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.parameters()) and model.bn.weight.grad is None


def test_taylor_scores_zero_without_affine_parameters():
    bn = nn.BatchNorm2d(3, affine=False)
    assert taylor_gate_scores(bn, torch.tensor([0, 1, 2])).tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- registry and integration


def test_paper_criteria_are_registered_with_their_hooks():
    assert set(PAPER_CRITERIA) <= set(list_criteria())
    hooks = {name: (get_criterion(name).needs_data, get_criterion(name).hook) for name in PAPER_CRITERIA}
    assert hooks["lrmf"] == (True, "output")
    assert hooks["dct"] == hooks["hrank"] == hooks["chip"] == (True, "activation")
    assert not hooks["icie"][0] and not hooks["sfp"][0]
    taylor = get_criterion("taylor")
    assert taylor.needs_labels and taylor.scored_types == (nn.modules.batchnorm._BatchNorm,)
    for name in PAPER_CRITERIA:
        cls = get_criterion(name)
        assert cls.paper and cls.summary and cls.__module__ == f"prunecli.criteria.{name}"
    assert "[INFERRED]" in get_criterion("icie").summary and "[INFERRED]" in get_criterion("sfp").summary


def test_as_maps_shapes():
    assert as_maps(torch.zeros(2, 3)).shape == (2, 3, 1, 1)
    assert as_maps(torch.zeros(2, 3, 7)).shape == (2, 3, 7, 1)
    assert as_maps(torch.zeros(2, 3, 4, 5, 6)).shape == (2, 3, 20, 6)


@pytest.fixture(scope="module")
def resnet_graph():
    torch.manual_seed(14)
    model = resnet20().eval()
    return DependencyGraph(model, torch.randn(1, 1, 28, 28))


@pytest.mark.parametrize("name", PAPER_CRITERIA)
def test_every_prunable_resnet20_group_gets_finite_scores(resnet_graph, name):
    groups = [g for g in resnet_graph.groups if g.prunable]
    assert len(groups) == 12
    generator = torch.Generator().manual_seed(15)
    x = torch.randn(8, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (8,), generator=generator)
    criterion = get_criterion(name)()
    if criterion.needs_data:
        scores = score_with_data(criterion, resnet_graph, groups, [(x[:4], y[:4]), (x[4:], y[4:])])
    else:
        scores = score_weights(criterion, resnet_graph, groups)
    assert sorted(scores) == sorted(g.index for g in groups)
    for group in groups:
        s = scores[group.index]
        assert s.shape == (group.channels,) and s.dtype == torch.float64
        assert torch.isfinite(s).all()
        assert s.abs().mean().item() == pytest.approx(1.0, rel=1e-6)  # per-layer normalised
    assert all(p.grad is None for p in resnet_graph.model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_feature_statistics_agree_on_cuda():
    torch.manual_seed(16)
    features = torch.randn(4, 6, 9, 7).relu()
    for fn in (lrmf_statistic, rank_statistic, channel_independence, dct_energy, lambda f: dct_energy(f, "low")):
        cpu = fn(features)
        gpu = fn(features.cuda())
        assert gpu.device.type == "cuda"
        assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    weight = torch.randn(32, 4, 3, 3)
    assert_close(get_criterion("icie")().weight_scores(weight.cuda()).cpu(), get_criterion("icie")().weight_scores(weight))
    assert_close(similarity_scores(weight.cuda()).cpu(), similarity_scores(weight))
