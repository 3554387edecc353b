"""SFP: similarity-based filter pruning (not Soft Filter Pruning).

Li G., Li R., Li T., Shen C., Zou X., Wang J., Wang C., Li N., "Similarity-based filter pruning for
deep neural networks", Information Sciences, article 121418, doi 10.1016/j.ins.2024.121418.
docs/methods.md section 4. Not to be confused with Soft Filter Pruning (He et al., IJCAI 2018).

Confirmed (abstract only, no code published): the kernels of a layer are grouped into clusters of
similar kernels; in each cluster the unimportant and redundant kernels are pruned and representatives
kept; a per-layer Kernel Dispersion sets each layer's sparsity; recovery by distillation fine-tuning.

[INFERRED] (docs/methods.md 4(c), using its agglomerative alternative to k-means): filters are normalised,
``u_i = w_i / ||w_i||``, and clustered by average linkage on the cosine distance ``1 - u_i . u_j``; each
cluster keeps its filter with the largest L1 norm (``sfp_norm=2``: L2 norm). To give one ranking that is
right for *every* keep count, the whole dendrogram is built: at each merge the two clusters'
representatives meet, the one with the smaller norm is removed and scored with the merge step (earlier
removal = lower score), and the last survivor gets the top score. Keeping the k highest scores is then
exactly keeping one highest-norm representative per cluster of the k-cluster cut.

``kernel_dispersion`` ([INFERRED], docs/methods.md 4(d)) is the per-layer statistic for the dispersion
allocation: the mean over filters of ``1 - cos(u_i, mean u)``.

Departures: scores are ranks (1..n), not magnitudes, so ``--allocation global`` compares layers by rank
fraction; the paper's allocation is the dispersion one. The variable-temperature distillation belongs
to fine-tuning, not to scoring. Ties (exact duplicates) are broken deterministically: equal distances by
the order the merge loop meets them, equal norms in favour of the lower index. ``--group-scope`` does not apply:
the method clusters a layer's kernels, and a consumer's input slices are not kernels of that layer.

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
    """The merges of average-linkage clustering on the cosine distance ``1 - unit @ unit.T``, lowest first.

    Each entry ``(a, b)`` joins the cluster holding filter a with the cluster holding filter b. Built with
    the nearest-neighbour-chain algorithm on an n x n distance matrix updated in place by the Lance-Williams
    average-linkage rule: O(n^2) memory and O(n^2) time (each chain step and each merge is one O(n) pass).
    Average linkage is reducible, so sorting the chain's merges by height gives the same dendrogram as
    greedily merging the closest pair; heights are first made monotone from children to parents so that
    rounding cannot put a parent before its children.
    """
    n = unit.shape[0]
    dist = (1 - unit @ unit.T).clamp_(0, 2)
    dist.fill_diagonal_(float("inf"))
    size = [1.0] * n
    last = [-1] * n  # slot -> index of the merge that formed its cluster (slot s always holds filter s)
    merges: list[tuple[int, int, float]] = []
    chain: list[int] = []
    alive = n
    while alive > 1:
        if not chain:
            chain.append(0)  # slot 0 is never merged away (merges keep the lower slot)
        a = chain[-1]
        row = dist[a]
        nearest = int(row.argmin())
        if len(chain) > 1 and row[chain[-2]] <= row[nearest]:  # prefer the chain on ties: no cycles
            nearest = chain[-2]
        if len(chain) < 2 or nearest != chain[-2]:
            chain.append(nearest)
            continue
        chain.pop()
        chain.pop()
        i, j = min(a, nearest), max(a, nearest)
        height = float(dist[i, j])
        children = [merges[t][2] for t in (last[i], last[j]) if t >= 0]
        merges.append((i, j, max([height, *children])))
        last[i] = len(merges) - 1
        merged = (size[i] * dist[i] + size[j] * dist[j]) / (size[i] + size[j])
        merged[i] = merged[j] = float("inf")
        size[i], size[j] = size[i] + size[j], 0.0
        dist[i], dist[:, i] = merged, merged
        dist[j], dist[:, j] = float("inf"), float("inf")
        alive -= 1
    order = sorted(range(len(merges)), key=lambda t: merges[t][2])  # stable: chain order breaks ties
    return [merges[t][:2] for t in order]


def similarity_scores(weight: Tensor, norm: int = 1) -> Tensor:
    """[n, ...] -> [n] ranks 1..n; the top k are one highest-norm filter per cluster of the k-cluster cut."""
    flat = weight.detach().flatten(1).double().cpu()  # a sequential merge loop: fastest on the CPU
    n = flat.shape[0]
    importance = flat.norm(p=norm, dim=1).tolist()
    parent = list(range(n))  # union-find over filters; a root's representative is its highest-norm member
    representative = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    scores = torch.empty(n, dtype=torch.float64)
    for step, (a, b) in enumerate(average_linkage_merges(_unit_rows(flat))):
        ra, rb = root(a), root(b)
        pa, pb = representative[ra], representative[rb]
        keep, drop = (pa, pb) if (importance[pa], -pa) >= (importance[pb], -pb) else (pb, pa)
        scores[drop] = step + 1
        parent[rb] = ra
        representative[ra] = keep
    scores[representative[root(0)]] = n
    return scores.to(weight.device)


@register_criterion
class SimilarityFilterPruning(Criterion):
    name = "sfp"
    paper = "Li et al., Similarity-based filter pruning for deep neural networks, Information Sciences 2024"
    summary = "[INFERRED] similarity-based (not Soft Filter Pruning): keep the highest-norm filter of each cosine cluster"

    def __init__(self, seed: int = 0, **options):
        super().__init__(seed, **options)
        norm = self.options.get("sfp_norm", 1)
        if str(norm).strip() not in ("1", "2"):
            raise PrunecliError(f"sfp_norm must be 1 or 2, got {norm!r}")
        self.norm = int(norm)

    def weight_scores(self, weight: Tensor) -> Tensor:
        return similarity_scores(weight, self.norm)
