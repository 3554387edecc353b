"""SFP: similarity-based filter pruning (not Soft Filter Pruning).

Li G., Li R., Li T., Shen C., Zou X., Wang J., Wang C., Li N., "Similarity-based filter pruning for
deep neural networks", Information Sciences, article 121418, doi 10.1016/j.ins.2024.121418.
METHODS.md section 4. Not to be confused with Soft Filter Pruning (He et al., IJCAI 2018).

Confirmed (abstract only, no code published): the kernels of a layer are grouped into clusters of
similar kernels; in each cluster the unimportant and redundant kernels are pruned and representatives
kept; a per-layer Kernel Dispersion sets each layer's sparsity; recovery by distillation fine-tuning.

[INFERRED] (METHODS.md 4(c), using its agglomerative alternative to k-means): filters are normalised,
``u_i = w_i / ||w_i||``, and clustered by average linkage on the cosine distance ``1 - u_i . u_j``; each
cluster keeps its filter with the largest L1 norm (``sfp_norm=2``: L2 norm). To give one ranking that is
right for *every* keep count, the whole dendrogram is built: at each merge the two clusters'
representatives meet, the one with the smaller norm is removed and scored with the merge step (earlier
removal = lower score), and the last survivor gets the top score. Keeping the k highest scores is then
exactly keeping one highest-norm representative per cluster of the k-cluster cut.

``kernel_dispersion`` ([INFERRED], METHODS.md 4(d)) is the per-layer statistic for the dispersion
allocation: the mean over filters of ``1 - cos(u_i, mean u)``.

Departures: scores are ranks (1..n), not magnitudes, so ``--allocation global`` compares layers by rank
fraction; the paper's allocation is the dispersion one. The variable-temperature distillation belongs
to fine-tuning, not to scoring. Ties in distance merge the lowest indices first; ties in norm keep the
lower index.

Options:
    sfp_norm: 1 (default) or 2, the norm that picks each cluster's representative.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion
from prunecli.errors import PrunecliError

EPS = 1e-12


def _unit_rows(weight: Tensor) -> Tensor:
    flat = weight.flatten(1).double()
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(EPS)


def kernel_dispersion(weight: Tensor) -> float:
    """Kernel Dispersion of a layer: mean over filters of 1 - cos(u_i, mean u); 0 when all filters align.

    A mean direction of zero (e.g. two opposite filters) has no angle to anything: each filter then counts 1.
    """
    unit = _unit_rows(weight)
    centre = unit.mean(0)
    cos = unit @ centre / centre.norm().clamp_min(EPS)
    return float((1 - cos).mean())


def average_linkage_merges(unit: Tensor) -> list[tuple[int, int]]:
    """The merges of average-linkage clustering on the cosine distance ``1 - unit @ unit.T``, in order.

    Each entry ``(i, j)`` with ``i < j`` merges cluster j into cluster i (clusters are named by their lowest
    member). The distance matrix is updated in place with the Lance-Williams average-linkage rule and each
    row's nearest neighbour is cached, so a merge costs O(n) plus a rescan of the rows whose nearest
    neighbour was one of the merged clusters: O(n^2) memory and, in practice, O(n^2) time.
    """
    n = unit.shape[0]
    dist = (1 - unit @ unit.T).clamp_(0, 2)
    dist.fill_diagonal_(float("inf"))
    size = torch.ones(n, dtype=dist.dtype)
    near_d, near_i = dist.min(1)
    alive = torch.ones(n, dtype=torch.bool)
    merges = []
    for _ in range(n - 1):
        a = int(near_d.argmin())
        b = int(near_i[a])
        i, j = min(a, b), max(a, b)
        merged = (size[i] * dist[i] + size[j] * dist[j]) / (size[i] + size[j])
        merged[i] = merged[j] = float("inf")
        size[i] += size[j]
        dist[i], dist[:, i] = merged, merged
        dist[j], dist[:, j] = float("inf"), float("inf")
        alive[j] = False
        near_d[j] = float("inf")
        stale = ((near_i == i) | (near_i == j)) & alive
        stale[i] = True
        rows = stale.nonzero().flatten()
        near_d[rows], near_i[rows] = dist[rows].min(1)
        closer = merged < near_d
        near_d[closer] = merged[closer]
        near_i[closer] = i
        merges.append((i, j))
    return merges


def similarity_scores(weight: Tensor, norm: int = 1) -> Tensor:
    """[n, ...] -> [n] ranks 1..n; the top k are one highest-norm filter per cluster of the k-cluster cut."""
    flat = weight.detach().flatten(1).double().cpu()  # a sequential merge loop: fastest on the CPU
    n = flat.shape[0]
    importance = flat.norm(p=norm, dim=1).tolist()
    representative = list(range(n))
    scores = torch.empty(n, dtype=torch.float64)
    for step, (i, j) in enumerate(average_linkage_merges(_unit_rows(flat))):
        ri, rj = representative[i], representative[j]
        keep, drop = (ri, rj) if (importance[ri], -ri) >= (importance[rj], -rj) else (rj, ri)
        scores[drop] = step + 1
        representative[i] = keep
    scores[representative[0]] = n
    return scores.to(weight.device)


@register_criterion
class SimilarityFilterPruning(Criterion):
    name = "sfp"
    paper = "Li et al., Similarity-based filter pruning for deep neural networks, Information Sciences 2024"
    summary = "[INFERRED] similarity-based (not Soft Filter Pruning): keep the highest-norm filter of each cosine cluster"

    def __init__(self, seed: int = 0, **options):
        super().__init__(seed, **options)
        self.norm = int(self.options.get("sfp_norm", 1))
        if self.norm not in (1, 2):
            raise PrunecliError(f"sfp_norm must be 1 or 2, got {self.norm}")

    def weight_scores(self, weight: Tensor) -> Tensor:
        return similarity_scores(weight, self.norm)
