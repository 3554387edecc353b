"""Torch-Pruning's ``DependencyGraph``, subclassed rather than forked: the only module that imports torch_pruning.

The subclass walks each (layer, handler, index) once, leaves ops whose index mapping it cannot infer unmapped (the
groups through them are held with the reason), and its pruners leave None parameters alone and shrink a conv or
linear subclass's own per-channel parameters."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

from torch import nn

# (index, root index) pairs one group's walk may reach: a flatten into a classifier reaches channels x positions
# (VGG-16: 25,088); reshapes that Torch-Pruning reads as flattens, chained in attention blocks, reach millions
MAX_SPREAD = 500_000


class SpreadTooFar(Exception):
    """A group whose indices spread past ``MAX_SPREAD`` positions through reshapes."""


@functools.cache
def dependency_graph_type() -> type:
    """Torch-Pruning's ``DependencyGraph`` with a group walk that visits each (layer, handler, index) once.

    Torch-Pruning 1.6 walks a group by following each edge with the whole index list it arrived with, and stops only
    where a visited layer already holds that exact list. Where slices and concatenations hand a layer many
    different subsets of a group (timm's ReXNet, whose blocks add into a slice of a wider tensor), the walk grows
    without bound: 3.6 million items for one group of ReXNet-1.0, minutes of tracing. Every index mapping maps
    indices one by one, so following only the indices a (layer, handler) pair has not seen yet reaches the same
    indices. As Torch-Pruning's merge does, each layer keeps the first (index, root index) pair walked per index.

    Where Torch-Pruning's shape inference fails for one concat, reshape, split or expand (a concat of inputs whose
    width it cannot infer, a reshape it reads as a flatten by zero, timm's CoaT, CSPNet's focus, SHViT, Twins), the
    whole trace used to fail. The op is now left unmapped and remembered, and a group whose walk reaches it, or whose
    index mapping fails on the way, carries ``unmapped`` (the op and the error): it is described as unprunable and the
    rest of the model prunes as before. Its pruners and ``build_dependency`` fix three more things (below).

    A split's parts are mapped by the walk itself (``split_edges``), from the widths the trace recorded and the part
    each reader took (Torch-Pruning guessed the widths from a saved attribute that torch 2.x renamed, paired parts
    with readers in the order it met them, and, where a concat reads a part, applied the two ops' mappings in the
    wrong order)."""
    from numbers import Number

    import torch_pruning as tp
    from torch_pruning import _helpers, ops
    from torch_pruning.dependency import index_mapping
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.dependency.group import Group
    from torch_pruning.pruner import function

    def update_concat_index_mapping(graph, node) -> None:
        sizes = None
        if node.module.concat_sizes is None:  # once: its pruner keeps them as channels go, and we prune group by group
            sizes = _traced_concat_sizes(node, {id(p) for p, _ in graph.unwrapped_parameters})
            node.module.concat_sizes = sizes  # Torch-Pruning reads these before inferring any width itself
        index_mapping.update_concat_index_mapping(graph, node)
        if sizes is not None and node.module.offsets is None:  # it left the concat unmapped, as if along another dim
            raise TypeError("the width read after it is not its inputs' sum")

    def update_split_index_mapping(graph, node) -> None:
        """Once per split: its parts as traced (``traced_parts``; ``split_sizes``, the widths its pruner then keeps
        as channels go) and, for each edge to or from a reader, the part that reader took (``graph.split_edges``)."""
        if hasattr(node.module, "traced_parts"):
            return
        parts = _traced_split(node.grad_fn)
        if parts.widths is not None:
            for reader in dict.fromkeys(node.outputs):  # in the trace's order: a reader's autograd inputs
                taken = [position for fn, position in reader.grad_fn.next_functions if fn is node.grad_fn]
                edges = [d for d in node.dependencies if d.target is reader]
                back = [d for d in reader.dependencies if d.target is node]
                if not len(taken) == len(edges) == len(back):  # a layer called twice: one node, several autograd nodes
                    raise TypeError("which part each reader takes is not in the trace")
                for position, edge, back_edge in zip(taken, edges, back, strict=True):
                    graph.split_edges[id(edge)] = (node, position, False)
                    graph.split_edges[id(back_edge)] = (node, position, True)
            node.module.split_sizes = list(parts.widths)
        node.module.traced_parts = parts

    updates = {ops.OPTYPE.CONCAT: update_concat_index_mapping,
               ops.OPTYPE.SPLIT: update_split_index_mapping,
               ops.OPTYPE.RESHAPE: index_mapping.update_reshape_index_mapping,
               ops.OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
               ops.OPTYPE.EXPAND: index_mapping.update_expand_index_mapping,
               ops.OPTYPE.SLICE: index_mapping.update_slice_index_mapping}

    plain_update = index_mapping.update_index_mapping

    def update_index_mapping(graph) -> None:  # Torch-Pruning's loop, with each op's failure kept on our graphs
        if not hasattr(graph, "unmapped"):  # a graph of Torch-Pruning's own (its pruners build one) is left as it was
            plain_update(graph)
            return
        for node in graph.module2node.values():
            if node.type in updates:
                try:
                    updates[node.type](graph, node)
                except (ArithmeticError, IndexError, TypeError) as exc:
                    graph.unmapped.setdefault(node, exc)

    index_mapping.update_index_mapping = update_index_mapping  # build_dependency calls it through the module

    class NoneSafe:
        """Leaves a parameter a layer declares as None (GroupNorm or LayerNorm without bias: timm's PoolFormerV2) as
        None, where Torch-Pruning 1.6 tried to resize it."""

        def _prune_parameter_and_grad(self, weight, keep_idxs, pruning_dim):
            return None if weight is None else super()._prune_parameter_and_grad(weight, keep_idxs, pruning_dim)

    class ExtraOutParameters(NoneSafe):
        """Also resizes a conv or linear subclass's own per-output-channel parameters (timm's ScaledStdConv2d
        ``gain``, NFNet's), which Torch-Pruning leaves at their old length."""

        def prune_out_channels(self, layer: nn.Module, idxs):
            size = self.get_out_channels(layer)
            extras = [name for name, p in layer._parameters.items()
                      if name not in ("weight", "bias") and p is not None and p.dim() and p.shape[0] == size]
            layer = super().prune_out_channels(layer, idxs)
            keep = sorted(set(range(size)) - set(idxs))
            for name in extras:
                setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 0))
            return layer

    def completed(optype, base: type) -> type:
        if optype not in (ops.OPTYPE.CONV, ops.OPTYPE.DEPTHWISE_CONV, ops.OPTYPE.LINEAR):
            return type(base.__name__, (NoneSafe, base), {})
        # a depthwise conv's input pruning is its output pruning, one function that the graph's checks compare
        same = {"prune_in_channels": ExtraOutParameters.prune_out_channels} \
            if base.prune_in_channels is base.prune_out_channels else {}
        return type(base.__name__, (ExtraOutParameters, base), same)

    pruner_types = {optype: completed(optype, type(p)) for optype, p in function.PrunerBox.items()}

    class OnceEachDependencyGraph(tp.DependencyGraph):
        def __init__(self):
            super().__init__()
            self.unmapped: dict = {}  # op node -> the error that left its index mapping uninferred
            self.split_edges: dict = {}  # id of an edge between a split and a reader -> (split, part, towards split)
            self.REGISTERED_PRUNERS.update({optype: pruner() for optype, pruner in pruner_types.items()})
            pruners = list(self.REGISTERED_PRUNERS.values())
            self._in_channel_pruning_fn = {p.prune_in_channels for p in pruners if p is not None}
            self._out_channel_pruning_fn = {p.prune_out_channels for p in pruners if p is not None}

        def build_dependency(self, model: nn.Module, *args, unwrapped_parameters=None, **kwargs):
            """A parameter of no layer shaped like a square feature map (1, C, H, H) (a position embedding added to a
            conv's output: timm's Visformer, TNT) is pruned along C; Torch-Pruning took its last dimension (W). Other
            shapes keep Torch-Pruning's choice, the last dimension (NesT's (1, blocks, tokens, C))."""
            if unwrapped_parameters is None:
                layers = [m for m in model.modules()
                          if ops.module2type(m) in self.REGISTERED_PRUNERS and ops.module2type(m) != ops.OPTYPE.ELEMENTWISE]
                owned = {id(p) for m in layers for p in m.parameters()}
                unwrapped_parameters = [_helpers.UnwrappedParameters(p, 1) for p in model.parameters()
                                        if id(p) not in owned and p.dim() == 4 and p.shape[0] == 1
                                        and p.shape[2] == p.shape[3] != p.shape[1]]
            return super().build_dependency(model, *args, unwrapped_parameters=unwrapped_parameters, **kwargs)

        def get_all_groups(self, ignored_layers=(), root_module_types=(nn.Conv2d, nn.Linear)):
            """Torch-Pruning's groups, rooted in trace order (the output's end first), except that a layer whose output
            a split cuts is a root first: a walk started at a reader of one part (C2f's last bottleneck, which adds
            into the second half) reaches it partly, and its other parts would be in no group."""
            cut = {_producer(node, root_module_types) for node in self.module2node.values() if node.type == ops.OPTYPE.SPLIT}
            self.module2node = {**{m: n for m, n in self.module2node.items() if n in cut}, **self.module2node}
            return super().get_all_groups(list(ignored_layers), root_module_types)

        def get_pruning_group(self, module: nn.Module, pruning_fn, idxs) -> Group:
            if module not in self.module2node:
                raise ValueError(f"Module {module} is not in the dependency graph.")
            if isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
                pruning_fn = self.REGISTERED_PRUNERS[ops.OPTYPE.DEPTHWISE_CONV].prune_out_channels
            idxs = [_helpers._HybridIndex(idx=i, root_idx=i) for i in ([idxs] if isinstance(idxs, Number) else idxs)]
            index_mapping.update_index_mapping(self)
            root = self.module2node[module]
            # per (layer, handler): its Dependency, the (index, root index) pairs walked, the first pair per index
            found = {(root, pruning_fn): (Dependency(pruning_fn, pruning_fn, source=root, target=root), set(idxs),
                                          {i.idx: i for i in idxs})}
            stack, unmapped, spread = [(root, pruning_fn, idxs)], None, 0
            while stack and spread <= MAX_SPREAD:
                node, fn, arrived = stack.pop()
                for dep in node.dependencies:
                    if not dep.is_triggered_by(fn):
                        continue
                    mapped = arrived
                    try:
                        for mapping in self._index_mappings(dep):
                            if mapping is not None:
                                mapped = mapping(mapped)
                    except (ArithmeticError, IndexError, TypeError) as exc:
                        unmapped = unmapped or (dep.target, exc)
                        continue
                    if dep.target in self.unmapped:
                        unmapped = unmapped or (dep.target, self.unmapped[dep.target])
                    if not mapped:
                        continue
                    _, walked, first = found.setdefault((dep.target, dep.handler), (dep, set(), {}))
                    new = [i for i in mapped if i not in walked]
                    if new:
                        spread += len(new)
                        if spread > MAX_SPREAD:
                            unmapped = unmapped or (dep.target, SpreadTooFar(f"over {MAX_SPREAD:,} positions"))
                            break
                        walked.update(new)
                        for index in new:
                            first.setdefault(index.idx, index)
                        stack.append((dep.target, dep.handler, new))
            group = Group()
            group._DG, group.unmapped = self, unmapped
            for dep, walked, first in found.values():
                if not (isinstance(dep.target.module, nn.Parameter)
                        and any(dep.target.module is p for p in self.ignored_params)):
                    hybrid = list(first.values())
                    group.add_dep(dep, _helpers.to_plain_idxs(hybrid))
                    group[-1].root_idxs = _helpers.to_root_idxs(hybrid)
                    group[-1].shared = _shared_indices(walked, len(idxs))
            return group

        def _index_mappings(self, dep) -> list:
            """The edge's own mappings, after the split's (into its part) on an edge from a split, before it (back to
            the split's input) on an edge towards one: a concat reading a part maps its own channels first."""
            edge = self.split_edges.get(id(dep))
            if edge is None:
                return dep.index_mapping
            split, position, towards_split = edge
            offsets = [0, *itertools.accumulate(split.module.split_sizes)]
            part = index_mapping._SplitIndexMapping(offsets[position:position + 2], reverse=towards_split)
            return [*dep.index_mapping, part] if towards_split else [part, *dep.index_mapping]

    return OnceEachDependencyGraph


def _producer(split, layer_types: tuple[type, ...]):
    """The node of the layer whose output ``split`` cuts, through the ops that read one tensor (norms, activations)
    between them; None where an op reads several (an add)."""
    node = split
    while len(node.inputs) == 1:
        node = node.inputs[0]
        if isinstance(node.module, tuple(layer_types)):
            return node
    return None


@dataclass(frozen=True)
class SplitParts:
    """A traced split (``split``, ``chunk``): each part's width along the channels, None where it splits another dim
    (every part then carries every channel); and whether the forward gave the widths as a list (``split_with_sizes``),
    constants that removal cannot change, rather than one size (``chunk`` computes it from the input's width; a
    constant ``split(n)`` breaks the forward once the widths change, and the pipeline then holds that module)."""

    widths: tuple[int, ...] | None
    sizes_given: bool


def split_parts(op: nn.Module) -> SplitParts | None:
    """The parts of a traced split op, None for any other op."""
    return getattr(op, "traced_parts", None)


def _along_channels(fn) -> bool | None:
    """Whether an autograd concat or split works along dim 1 of a feature map or of flat features; None for tokens
    (B, N, C), whose channel dim the shape does not tell, or where the trace did not record the dim."""
    if not hasattr(fn, "_saved_dim") or not getattr(fn, "_input_metadata", None):
        return None
    ndim = len(fn._input_metadata[0].shape)
    dim = fn._saved_dim if fn._saved_dim < 2**63 else fn._saved_dim - 2**64  # a negative dim is saved as unsigned
    return None if ndim == 3 else (dim if dim >= 0 else dim + ndim) == 1


def _traced_width(fn, position: int) -> int:
    """The channels of output ``position`` of an autograd node, as the trace recorded its shape."""
    return int(fn._input_metadata[position].shape[1])


def _traced_split(fn) -> SplitParts:
    """A split's parts as the trace recorded them; a split of tokens or of an unrecorded dim raises (TypeError)."""
    along = _along_channels(fn)
    if along is None:
        raise TypeError("the dim it splits is not known to be or not to be the channels")
    widths = tuple(_traced_width(fn, i) for i in range(len(fn._input_metadata))) if along else None
    return SplitParts(widths, "WithSizes" in fn.name())


def _traced_concat_sizes(node, unwrapped: set[int]) -> list[int] | None:
    """The widths of a channel concat's inputs as the trace saw them, in the order of the node's inputs; None where
    the concat is not along dim 1 of a feature map or of flat features (tokens (B, N, C) are left to Torch-Pruning).

    Torch-Pruning infers each width by walking back from the input to a layer that declares it, and takes the last
    input's answer at every op it passes: a PReLU with one shared weight (MONAI's default activation) answers with its
    reshaped weight, which declares no width, so the walk gives None and the concat's offsets sum an int and None
    (every skip connection of MONAI's UNet). Autograd records the real shape of every operand. An operand that is no
    node of the graph (the model's input, a constant) is left out of Torch-Pruning's offsets: before a traced operand
    it would shift that operand's channels onto its own, so such a concat is reported unmappable (TypeError)."""
    fn = node.grad_fn
    operands = getattr(fn, "next_functions", ())
    if not operands or not _along_channels(fn):
        return None
    traced = [operand is not None and (not hasattr(operand, "variable") or id(operand.variable) in unwrapped)
              for operand, _ in operands]
    if False in traced and True in traced[traced.index(False):]:
        raise TypeError("an untraced operand (input, constant) precedes a traced one")
    sizes = [_traced_width(operand, position)
             for (operand, position), node_of_graph in zip(operands, traced, strict=True) if node_of_graph]
    return sizes if len(sizes) == len(node.inputs) else None


def _shared_indices(pairs, channels: int) -> int | None:
    """How many root channels each index of a layer stands for: 1 where each has one root; ``k`` where every index
    is reached from ``k`` roots spaced ``channels / k`` apart (GhostNet: a depthwise "cheap" conv doubles its primary
    conv's channels and a concat joins both, so primary channel j goes with roots j and j + channels / 2); None
    where the roots follow no such blocks, and no plan of single positions can prune the layer."""
    roots: dict[int, set] = {}
    for pair in pairs:
        roots.setdefault(pair.idx, set()).add(pair.root_idx)
    counts = {len(r) for r in roots.values()}
    if counts == {1}:
        return 1
    k = counts.pop() if len(counts) == 1 else 0
    if not k or channels % k or any(None in r for r in roots.values()):
        return None
    step = channels // k
    return k if all(sorted(r) == list(range(min(r), channels, step)) and min(r) < step for r in roots.values()) else None
