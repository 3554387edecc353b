"""EDP: decomposition-and-pruning training with a Pruning & Merging step.

Ruan, Liu, Yuan, Li, Hu, Li, Maybank, "EDP: An Efficient Decomposition and Pruning Scheme for Convolutional
Neural Network Compression", IEEE TNNLS 32(10):4499-4513, 2021 (doi 10.1109/TNNLS.2020.3018177).

Neither the paper's code nor its full text is public; this follows docs/methods.md section 5, which
reconstructs the method from the abstract and from Hinge (Li et al., CVPR 2020), the closest public method:

* every prunable conv becomes a *compressed-aware block*: a basis conv (same kernel, stride, padding; no bias)
  followed by a 1x1 coefficient conv ``A`` holding the bias, initialised by SVD of the weight (or basis = the
  weight, ``A`` = identity), so the network computes what it did;
* one training stage with a proximal group-lasso step on the rows and columns of every ``A`` after each optimiser
  step (``lambda``, Hinge's ``proximal_operator``);
* Pruning & Merging: zero columns of ``A`` drop basis filters (low rank), zero rows drop output channels with
  their norm and the next layer's inputs (the constant a dropped channel leaves is folded into the consumers'
  bias), and a block whose decomposed form no longer saves MACs is merged back into one conv, exactly.

Our deviations, all [INFERRED] because the paper's schedule is unknown:

* Budget: the paper tunes lambda to reach a compression; we meet ``--flops-target`` directly. Before training
  and after every epoch but the last, the rows and columns of ``A`` are ranked by their norms (normalised to
  mean 1 per group) and the allocator picks, with a cost model that knows which blocks will be merged back,
  the ones whose removal meets the budget. Each picked channel's whole group (coefficient rows or columns, its
  norm parameters and the next layer's input weights) is projected after every step onto a ball whose radius
  falls linearly from its norm at selection to zero at the last step. So the chosen groups end *exactly*
  zero, removing them changes nothing, and the network has trained without them.
* Groups whose producers are not coefficient convs (grouped convs, linear layers) are not pruned: nothing
  regularises them.
* Merging is decided per block with the final widths: merge when ``M'(C k^2 + N') >= N' C k^2``.

Modules: ``blocks`` (decomposition, the budget after merging, the parameters of a channel group), ``group_lasso``
(the training stage: the proximal step and the selected groups' decay) and ``prune_merge`` (Pruning & Merging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from prunecli.allocate import Plan
from prunecli.layers import decomposed_layers
from prunecli.methods.edp.blocks import (
    MergeAwareCost,
    check_decomposable,
    decomposable,
    decompose,
    edp_scores,
    eligible_groups,
)
from prunecli.methods.edp.group_lasso import EdpTraining
from prunecli.methods.edp.prune_merge import PruneMergeRecord, prune_and_merge
from prunecli.planning import Selection
from prunecli.runtime import model_device
from prunecli.training import finetune

if TYPE_CHECKING:
    from prunecli.config import EdpOptions


@dataclass(frozen=True)
class EdpResult:
    """The slim model (decomposed blocks that pay off, merged convs elsewhere), the plan that met the budget,
    the absolute target, the selections made while training, the training record and what PM did."""

    model: nn.Module
    plan: Plan
    target: float
    selections: list[dict[str, Any]]
    training: Any  # prunecli.training.FinetuneResult
    prune_merge: PruneMergeRecord

    def record(self) -> dict[str, Any]:
        """What the slim file's metadata records. EDP keeps the last epoch's weights (only its last step has the
        selected groups at exactly zero), so ``best_epoch`` is the last and ``best_top1`` that epoch's validation
        top-1 (the fine-tuning loop, which keeps no best epoch here, leaves it None)."""
        training = self.training.record()
        if training["best_top1"] is None:
            kept = [h["val_top1"] for h in training["history"] if h["epoch"] == training["best_epoch"]]
            training["best_top1"] = kept[0] if kept else None
        return {"selections": self.selections, "training": training, **self.prune_merge.to_dict()}


def edp_prune(
    model: nn.Module,
    example_input: Tensor,
    train,
    val,
    edp: EdpOptions,
    selection: Selection,
    *,
    progress=None,
) -> EdpResult:
    """Decompose, train with the group-sparse regulariser towards ``selection.budget``, then Pruning & Merging.

    Args:
        model: changed in place (decomposed, trained, pruned); pass a copy to keep the original.
        example_input: a batch the model accepts, to trace its channel groups.
        train, val: labelled ``ImageSet``s; ``val`` (optional) is evaluated after every epoch.
        edp: the training stage (epochs, lr, batch size, device, seed, DDP as ``finetune``), the group-lasso
            strength ``lam`` on every row and column of the coefficient matrices, the ``threshold`` below which
            Pruning & Merging also drops rows and columns, and the ``init`` (``svd`` or ``identity``) of the blocks.
        selection: the budget (MACs or params), allocation, limits and ``ignore``; EDP scores its own way.
    """
    names = decomposable(model, selection.plan.ignore)
    check_decomposable(names)
    decompose(model, names, edp.init)
    graph, cost_model = selection.trace(model, example_input)
    blocks = decomposed_layers(model)
    after_merging = MergeAwareCost(cost_model, list(blocks))
    groups = eligible_groups(graph, blocks)

    def select() -> tuple[Plan, float]:
        return selection.plan_on(graph, cost_model, edp_scores(graph, groups, decomposed_layers(model)),
                                 after_merging.evaluate)

    hook = EdpTraining(graph, select, edp.lam)
    trained = finetune(model, train, val, edp.training, progress=progress, hook=hook)
    sample = (val if val is not None else train).images[:64].to(model_device(model))
    record = prune_and_merge(graph, hook.plan, groups, sample, edp.threshold)
    return EdpResult(graph.model.eval(), hook.plan, hook.target, hook.selections, trained, record)
