"""Channel-dependency groups and their physical removal: the only module that imports torch_pruning.

Torch-Pruning's ``DependencyGraph`` traces the model once and tells which channel dimensions are
coupled (residual adds, concatenation, depthwise convs, squeeze-excite, flatten into Linear). We turn
its groups into plain dataclasses that the rest of prunecli reads, and apply our own removal plans
through it. Its pruners, importances and schedulers are not used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunecli.errors import ArchitectureError, first_line
from prunecli.layers import CONV_LINEAR
from prunecli.outputs import output_tensors
from prunecli.runtime import time_limit

# Torch-Pruning's traced ops that cut a channel dimension into parts. The part sizes are constants in the
# model's forward, which removal cannot change: a removal that is not spread exactly as they expect
# breaks the forward or, worse, silently feeds the wrong channels to the consumers.
SPLIT_OPS = frozenset({"_SplitOp", "_SliceOp", "_UnbindOp"})


@dataclass(frozen=True)
class Member:
    """One layer dimension inside a group.

    ``indices[i]`` is the layer's own channel index that moves with group channel ``root_indices[i]``
    (a Linear after a flatten has several inputs per channel; a concat shifts the indices).
    """

    layer: str
    dim: str  # "out" or "in"
    indices: tuple[int, ...]
    root_indices: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """A set of channels that must be removed together, named after its root layer's output."""

    index: int
    root: str
    channels: int
    blocks: int  # grouped convs / GroupNorm: the same positions must go from each of this many blocks
    members: tuple[Member, ...]
    prunable: bool
    reason: str = ""

    def layers(self, dim: str) -> list[str]:
        return list(dict.fromkeys(m.layer for m in self.members if m.dim == dim))

    @property
    def parts(self) -> tuple[tuple[int, ...], ...]:
        """The positions of each layer that holds only part of the group (concat branches merged by an add or a
        depthwise conv): a plan that takes all of them would empty that layer."""
        found = {tuple(sorted(set(m.root_indices))) for m in self.members}
        return tuple(sorted(p for p in found if len(p) < self.channels))


# (index, root index) pairs one group's walk may reach: a flatten into a classifier reaches channels x positions
# (VGG-16: 25,088); reshapes that Torch-Pruning reads as flattens, chained in attention blocks, reach millions
MAX_SPREAD = 500_000


class _Spread(Exception):
    """A group whose indices spread past ``MAX_SPREAD`` positions through reshapes."""


@functools.cache
def _dependency_graph_type() -> type:
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
    rest of the model prunes as before. Its pruners and ``build_dependency`` fix three more things (below)."""
    from numbers import Number

    import torch_pruning as tp
    from torch_pruning import _helpers, ops
    from torch_pruning.dependency import index_mapping, shape_infer
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.dependency.group import Group
    from torch_pruning.pruner import function

    def update_concat_index_mapping(graph, node) -> None:
        sizes = None
        if node.module.concat_sizes is None:  # once: its pruner keeps them as channels go, and we prune group by group
            sizes = _traced_concat_sizes(node, {id(p) for p, _ in graph.unwrapped_parameters})
            if sizes is not None:  # a split's part keeps the width its split's mapping was given (one walk agrees)
                sizes = [shape_infer.infer_channels_between(graph, i, node) if i.type == ops.OPTYPE.SPLIT else size
                         for i, size in zip(node.inputs, sizes, strict=True)]
            node.module.concat_sizes = sizes  # Torch-Pruning reads these before inferring any width itself
        index_mapping.update_concat_index_mapping(graph, node)
        if sizes is not None and node.module.offsets is None:  # it left the concat unmapped, as if along another dim
            raise TypeError("the width read after it is not its inputs' sum")

    updates = {ops.OPTYPE.CONCAT: update_concat_index_mapping,
               ops.OPTYPE.SPLIT: index_mapping.update_split_index_mapping,
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
                        for mapping in dep.index_mapping:
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
                            unmapped = unmapped or (dep.target, _Spread(f"over {MAX_SPREAD:,} positions"))
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

    return OnceEachDependencyGraph


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
    if not operands or not hasattr(fn, "_saved_dim") or not hasattr(fn, "_input_metadata"):
        return None
    ndim = len(fn._input_metadata[0].shape)
    dim = fn._saved_dim if fn._saved_dim < 2**63 else fn._saved_dim - 2**64  # a negative dim is saved as unsigned
    if ndim == 3 or (dim if dim >= 0 else dim + ndim) != 1:
        return None
    traced = [operand is not None and (not hasattr(operand, "variable") or id(operand.variable) in unwrapped)
              for operand, _ in operands]
    if False in traced and True in traced[traced.index(False):]:
        raise TypeError("an untraced operand (input, constant) precedes a traced one")
    sizes = [int(operand._input_metadata[position].shape[1])
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


def _channel_blocks(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        if module.groups == module.in_channels == module.out_channels:
            return 1  # depthwise: its input channels follow its output channels one to one
        if module.groups == module.out_channels:
            # Torch-Pruning resizes any conv with groups == out_channels as if it were depthwise, which is
            # wrong when in_channels differs: blocks of one channel pin both of its groups
            return max(module.in_channels, module.out_channels)
        # grouped, including depthwise with a channel multiplier (groups == in_channels < out_channels):
        # every group must keep the same number of channels
        return module.groups
    if isinstance(module, nn.GroupNorm):
        return module.num_groups
    if isinstance(module, nn.MultiheadAttention):
        return module.num_heads  # every head keeps the same width, losing the same positions
    return 1


def _partial(module: nn.Module, dim: str, indices, blocks: int) -> bool:
    """A layer that only partly belongs to a group where it must belong whole: a conv/linear producer holds
    all its output channels in one group, and a grouped layer's block structure spans its whole input. Seen
    otherwise only behind a concatenation that Torch-Pruning maps wrongly (into flatten or grouped convs), as is
    an index past the layer's channels (timm's MobileNetV5)."""
    if not isinstance(module, CONV_LINEAR):
        return False
    conv = isinstance(module, nn.modules.conv._ConvNd)
    size = (module.out_channels if conv else module.out_features) if dim == "out" else (
        module.in_channels if conv else module.in_features)
    if max(indices, default=-1) >= size:
        return True
    if dim == "out":
        return len(set(indices)) != size
    return blocks > 1 and len(set(indices)) != module.in_channels


def _sync_vision_transformer(model: nn.Module) -> None:
    model.hidden_dim = model.conv_proj.out_channels


# Architectures Torch-Pruning's tracer cannot handle, refused at once instead of after a crash or a long
# hang (seen on torchvision 0.29: swin and maxvit tracing grew past 10-20 GB without finishing).
UNSUPPORTED = {
    "torchvision.models.swin_transformer.SwinTransformer": "tracing its shifted-window attention does not finish "
    "(and exhausts memory); prune a CNN or a ViT instead",
    "torchvision.models.maxvit.MaxVit": "tracing its block/grid attention does not finish (and exhausts memory); "
    "prune a CNN or a ViT instead",
    "torchvision.models.video.swin_transformer.SwinTransformer3d": "tracing its 3-D shifted-window attention fails "
    "or does not finish in 120 s; prune a 3-D CNN (r3d_18, r2plus1d_18, s3d) or an MViT instead",
    "torchvision.models.optical_flow.raft.RAFT": "an optical-flow model takes two images and refines its flow in a "
    "loop of recurrent updates; prunecli prunes models of one image batch",
}


def refuse_unsupported(model: nn.Module) -> None:
    """Raise the one-line reason why prunecli does not prune ``model``'s architecture, if it is a known one."""
    refusal = UNSUPPORTED.get(f"{type(model).__module__}.{type(model).__qualname__}")
    if refusal is not None:
        raise ArchitectureError(f"{type(model).__name__} cannot be pruned: {refusal}")


# Attributes that some architectures keep outside their layers and read in ``forward``; pruning the layers
# leaves them stale, so they are set again from the layers after every removal.
def _sync_metaformer_scale(scale: nn.Module) -> None:  # timm's layer and residual scales reshape by ``shape``
    scale.shape = (scale.scale.shape[0], *scale.shape[1:])


ATTRIBUTE_SYNC = {"torchvision.models.vision_transformer.VisionTransformer": _sync_vision_transformer,
                  "timm.models.metaformer.Scale": _sync_metaformer_scale}

SHUFFLE = "reaches a channel shuffle (ShuffleNetV2 interleaves the two branches' channels)"


class _ShuffleStandIn(nn.Conv2d):
    """ShuffleNetV2's channel shuffle as the 1x1 convolution with a permutation matrix that it is, for tracing only.

    The real shuffle (view, transpose, view) defeats Torch-Pruning's index mapping (it crashes on it). As a conv it
    is a boundary the tracer understands: the block outputs that feed it, and the chunk after it, form groups
    that stay whole, while the channels inside each branch (most of the network's MACs) prune freely."""

    def __init__(self, channels: int, groups: int):
        with torch.random.fork_rng(devices=[]):  # its random init must not move the seeded stream of a run
            super().__init__(channels, channels, 1, bias=False)
        order = torch.arange(channels).view(groups, channels // groups).t().reshape(-1)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[torch.arange(channels), order] = 1.0


@contextlib.contextmanager
def _out_of_place(model: nn.Module):
    """Activations run out of place while tracing: an in-place ReLU straight after a conv rewrites the tensor's
    autograd history so that the tracer no longer sees the conv (SSD300's VGG traced no layer at all)."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for module in changed:
        module.inplace = False
    try:
        yield
    finally:
        for module in changed:
            module.inplace = True


@contextlib.contextmanager
def _traceable_shuffles(model: nn.Module):
    """While tracing, every ShuffleNetV2 block shuffles through a ``_ShuffleStandIn`` child; afterwards the
    model is as it was (the stand-ins only ever sit in groups that are not pruned)."""
    from torchvision.models import shufflenetv2

    blocks = [m for m in model.modules() if isinstance(m, shufflenetv2.InvertedResidual)]
    if not blocks:
        yield
        return
    original, current = shufflenetv2.channel_shuffle, []

    def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
        return current[-1].shuffle_stand_in(x)

    def enter(block, args) -> None:
        current.append(block)

    def leave(block, args, output) -> None:
        current.pop()

    hooks = []
    for block in blocks:
        block.shuffle_stand_in = _ShuffleStandIn(2 * block.branch2[5].out_channels, 2).to(block.branch2[5].weight)
        hooks += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    shufflenetv2.channel_shuffle = shuffle
    try:
        yield
    finally:
        shufflenetv2.channel_shuffle = original
        for hook in hooks:
            hook.remove()
        for block in blocks:
            del block.shuffle_stand_in


class DependencyGraph:
    """The channel groups of one model, and removal of channels from that model in place.

    Args:
        model: the model; ``prune`` mutates it, so pass a copy when the original must survive.
        example_input: a batch the model accepts, used once to trace it.
        ignore: glob patterns of layer names whose output channels must stay.
        timeout: seconds allowed for tracing.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        ignore: Sequence[str] = (),
        timeout: float | None = None,
    ):
        refuse_unsupported(model)
        self.model = model
        self._names = {module: name for name, module in model.named_modules()}
        self._output_grad_fns: set = set()
        was_training = model.training
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for param in frozen:  # the tracer follows autograd: a frozen model would show no dependencies
            param.requires_grad_(True)
        model.eval()
        try:
            with time_limit(timeout, "tracing the model's channel dependencies"), warnings.catch_warnings(), \
                    _traceable_shuffles(model), _out_of_place(model):
                warnings.simplefilter("ignore")
                self._graph = _dependency_graph_type()().build_dependency(
                    model, example_inputs=example_input, verbose=False, output_transform=self._note_outputs
                )
                raw_groups = list(self._graph.get_all_groups(root_module_types=CONV_LINEAR))
        except ArchitectureError:
            raise
        except Exception as exc:
            raise ArchitectureError(
                f"cannot trace the model's channel dependencies ({type(exc).__name__}: {exc}); "
                "this architecture is not supported for pruning"
            ) from exc
        finally:
            model.train(was_training)
            for param in frozen:
                param.requires_grad_(False)
        self.groups = [self._describe(i, g, ignore) for i, g in enumerate(raw_groups)]
        self._pruned = False

    def _note_outputs(self, output):
        """Remember where the traced output tensors come from: a group whose channels reach one of them must keep
        its width even when other layers read it too (an FPN level that also feeds P6, an SSD feature map that the
        backbone goes on from)."""
        self._output_grad_fns = {t.grad_fn for t in output_tensors(output) if t.grad_fn is not None}
        return output

    def _describe(self, index: int, raw, ignore: Sequence[str]) -> ChannelGroup:
        members, blocks, split, ambiguous = [], 1, False, False
        is_out = self._graph.is_out_channel_pruning_fn
        feeds_output = shuffled = False
        for item in raw.items:
            module = item.dep.target.module
            name = self._names.get(module)
            dim = "out" if is_out(item.dep.handler) else "in"
            # the traced output is this node's result, and the group's channels are that result's channels (not
            # those of a conv/linear that only reads the group)
            produces_output = item.dep.target.grad_fn in self._output_grad_fns
            feeds_output = feeds_output or (produces_output and (dim == "out" or not isinstance(module, CONV_LINEAR)))
            if name is None:  # a traced op (add, concat, reshape) or a shuffle's stand-in, not a layer
                split = split or type(module).__name__ in SPLIT_OPS
                shuffled = shuffled or isinstance(module, _ShuffleStandIn)
                continue
            members.append(Member(name, dim, tuple(item.idxs), tuple(item.root_idxs)))
            shared = getattr(item, "shared", 1)  # a layer whose channels each stand for several root channels
            ambiguous = ambiguous or shared is None
            blocks = math.lcm(blocks, _channel_blocks(module), shared or 1)
            ambiguous = ambiguous or _partial(module, dim, item.idxs, _channel_blocks(module))
        root = self._names.get(raw[0].dep.target.module) or members[0].layer  # a stand-in: name a layer that reads it
        channels = len(raw[0].idxs)
        outs = [m.layer for m in members if m.dim == "out"]
        ignored = next((p for p in ignore for layer in outs if fnmatch.fnmatchcase(layer, p)), None)
        consumers = [m for m in members if m.dim == "in"]
        reason = ""
        if raw.unmapped is not None:
            op, exc = raw.unmapped
            reason = (f"its channels spread {exc} through reshapes read as flattens" if isinstance(exc, _Spread) else
                      f"passes through a {type(op.module).__name__.strip('_').removesuffix('Op').lower()} whose channel "
                      f"mapping cannot be inferred ({type(exc).__name__}: {first_line(exc, 60)})")
        elif ignored is not None:
            reason = f"ignored ({ignored})"
        elif shuffled:  # before the outputs: the stand-in that reads the group is no consumer of the model's
            reason = SHUFFLE
        elif feeds_output or not consumers:
            reason = "feeds the model output"
        elif split:
            reason = "split into fixed-size parts (split/chunk/slice/unbind)"
        elif ambiguous:
            reason = "a concatenation meets a grouped layer or a flatten; the channel mapping is ambiguous"
        elif channels % blocks:  # NextViT: a concat of branches whose grouped convs split it differently
            reason = f"its grouped layers need {blocks} equal blocks, which {channels} channels do not make"
        elif channels // blocks < 2:
            reason = "too few channels"
        return ChannelGroup(index, root, channels, blocks, tuple(members), not reason, reason)

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def hold(self, within: Sequence[type], reason: str) -> None:
        """Make every prunable group with a layer inside a module of the types ``within`` unprunable: the forward of
        such a module reads a width from elsewhere (an attribute, a constant in a reshape), which removal cannot change."""
        owners = [f"{name}." for name, module in self.model.named_modules() if type(module) in within]
        self.groups = [
            dataclasses.replace(g, prunable=False, reason=reason)
            if g.prunable and any(f"{m.layer}.".startswith(o) for m in g.members for o in owners) else g
            for g in self.groups
        ]

    def kept_outputs(self, removal: Mapping[int, Sequence[int]]) -> dict[str, list[int]]:
        """For every conv/linear that loses output channels under ``removal``: its original output indices that stay."""
        kept = {}
        for group in self.groups:
            positions = {int(p) for p in removal.get(group.index, ())}
            for member in group.members if positions else ():
                module = self.module(member.layer)
                if member.dim != "out" or not isinstance(module, CONV_LINEAR):
                    continue
                size = module.out_features if isinstance(module, nn.Linear) else module.out_channels
                gone = {i for i, root in zip(member.indices, member.root_indices, strict=True) if root in positions}
                kept[member.layer] = [i for i in range(size) if i not in gone]
        return kept

    def sole_norm_consumer(self, layer: str) -> str | None:
        """The batch norm that alone reads ``layer``'s output, if there is one: where a bias can fold into its mean."""
        node = self._graph.module2node.get(self.module(layer))
        consumers = {id(n.module): n.module for n in (node.outputs if node is not None else ())}
        if len(consumers) != 1:
            return None
        (consumer,) = consumers.values()
        if isinstance(consumer, nn.modules.batchnorm._BatchNorm):
            return self._names.get(consumer)
        return None

    def prune(self, removal: Mapping[int, Sequence[int]]) -> None:
        """Remove the given root-channel positions of each group (by group index), in place.

        The groups describe the traced model, so one graph prunes once; trace the result again to go on.
        """
        if self._pruned:
            raise ArchitectureError("this dependency graph has already pruned its model; trace the pruned model again")
        self._pruned = True
        by_index = {g.index: g for g in self.groups}
        for index, positions in sorted(removal.items()):
            if not positions:
                continue
            group = by_index[index]
            if not group.prunable:
                raise ArchitectureError(f"group {group.root} cannot be pruned: {group.reason}")
            root = self.module(group.root)
            pruner = self._graph.get_pruner_of_module(root)
            items = self._graph.get_pruning_group(root, pruner.prune_out_channels, sorted(int(p) for p in positions))
            if not self._graph.check_pruning_group(items):
                raise ArchitectureError(f"removing {len(positions)} channels would empty a layer in group {group.root}")
            try:
                items.prune()
            except Exception as exc:  # a layer type whose removal Torch-Pruning gets wrong
                raise ArchitectureError(
                    f"Torch-Pruning cannot remove channels of group {group.root} ({type(exc).__name__}: "
                    f"{first_line(exc, 120)}); this architecture is not supported for pruning"
                ) from exc
        for module in self.model.modules():
            sync = ATTRIBUTE_SYNC.get(f"{type(module).__module__}.{type(module).__qualname__}")
            if sync is not None:
                sync(module)


def failing_module(model: nn.Module, example_input: torch.Tensor) -> tuple[nn.Module, Exception] | None:
    """Run ``model`` once: None if it runs, else the innermost module whose forward raised (a layer that raised
    stands for its parent, whose code fed it the wrong width, and a Sequential for its owner) and the error."""
    active: list[nn.Module] = []

    def leave(module, args, output) -> None:  # a hook that returned a value would replace the output
        active.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(lambda m, args: active.append(m)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as exc:
        parents = {child: parent for parent in model.modules() for child in parent.children()}
        inner = active[-1] if active else model
        if not any(True for _ in inner.children()):
            inner = parents.get(inner, model)
        while isinstance(inner, nn.Sequential):  # a container's forward holds no widths; its owner's may
            inner = parents.get(inner, model)
        return inner, exc
    finally:
        for handle in handles:
            handle.remove()
    return None
