"""Channel-dependency groups and their physical removal, on Torch-Pruning's tracer.

Torch-Pruning's ``DependencyGraph`` traces the model once and tells which channel dimensions are
coupled (residual adds, concatenation, depthwise convs, squeeze-excite, flatten into Linear). We turn
its groups into plain dataclasses that the rest of prunecli reads, and apply our own removal plans
through it. Its pruners, importances and schedulers are not used.

Modules: ``torch_pruning_graph`` (Torch-Pruning's graph, subclassed: the only importer of torch_pruning), ``tracing``
(the model as the tracer must see it: activations out of place, ShuffleNetV2's shuffle as a conv), ``architectures``
(those refused, widths kept in attributes, the module whose forward breaks after a removal).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunecli.errors import ArchitectureError, first_line
from prunecli.graph.architectures import ATTRIBUTE_SYNC, refuse_unsupported
from prunecli.graph.torch_pruning_graph import SpreadTooFar, dependency_graph_type, split_parts
from prunecli.graph.tracing import SHUFFLE, ShuffleStandIn, out_of_place, traceable_shuffles
from prunecli.layers import CONV_LINEAR
from prunecli.outputs import output_tensors
from prunecli.runtime import time_limit

# Torch-Pruning's traced ops that cut a channel dimension into parts whose bounds are constants in the model's
# forward, which removal cannot change: a removal that is not spread exactly as they expect breaks the forward or,
# worse, silently feeds the wrong channels to the consumers. (A split or chunk is judged by its traced parts.)
FIXED_PART_OPS = frozenset({"_SliceOp", "_UnbindOp"})


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
    grouped_conv: str = ""  # a grouped conv this group reads and writes: it loses whole conv groups (its blocks)

    def layers(self, dim: str) -> list[str]:
        return list(dict.fromkeys(m.layer for m in self.members if m.dim == dim))

    @property
    def parts(self) -> tuple[tuple[int, ...], ...]:
        """The positions of each layer that holds only part of the group (concat branches merged by an add or a
        depthwise conv): a plan that takes all of them would empty that layer."""
        found = {tuple(sorted(set(m.root_indices))) for m in self.members}
        return tuple(sorted(p for p in found if len(p) < self.channels))


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


def _grouped_conv(module: nn.Module) -> bool:
    """A conv in groups of several channels (not depthwise)."""
    return isinstance(module, nn.modules.conv._ConvNd) and _channel_blocks(module) > 1


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


@dataclass(frozen=True)
class WholeConvGroups:
    """A grouped conv's input group and output group, pruned as one group in whole conv groups: what removal needs.
    ``inputs_at``/``outputs_at``: each root position of the two groups -> its position in the merged group."""

    conv: str
    inputs: ChannelGroup
    outputs: ChannelGroup
    inputs_at: dict[int, int]
    outputs_at: dict[int, int]


def _conv_group_positions(group: ChannelGroup, layer: str, dim: str, groups: int) -> dict[int, int] | None:
    """Each root position of ``group`` -> the merged position of the channel ``layer`` holds it at along ``dim``:
    channel c of conv group c // width at (c % width) * groups + c // width, so that the allocator's blocks (the same
    position from each of ``width`` blocks) are whole conv groups. None where the layer does not hold the whole group
    one channel per position."""
    found = [m for m in group.members if m.layer == layer and m.dim == dim]
    if len(found) != 1 or sorted(found[0].indices) != list(range(group.channels)) \
            or sorted(found[0].root_indices) != list(range(group.channels)):
        return None
    (member,) = found
    width = group.channels // groups
    return {root: (c % width) * groups + c // width for c, root in zip(member.indices, member.root_indices, strict=True)}


def _split_blocks(item, channels: int) -> tuple[int, str]:
    """What a split (``split``, ``chunk``) that a group's walk reaches asks of the group: the equal blocks its channels
    must be removed in (one per part, the same positions from each, so every part keeps the width of the others, as
    ``chunk`` will cut them) and, where no removal keeps the parts right, why (for the reason "split into ...").
    (1, "") for any other op, and for a split along another dim, whose every part carries every channel."""
    if type(item.dep.target.module).__name__ in FIXED_PART_OPS:
        return 1, "fixed-size parts (slice/unbind)"
    parts = split_parts(item.dep.target.module)
    if parts is None or parts.widths is None:
        return 1, ""
    if parts.sizes_given:
        return 1, f"parts of widths fixed in the forward {parts.widths} (split with sizes)"
    if len(set(parts.widths)) > 1:
        return 1, f"parts of unequal widths {parts.widths}"
    if sum(parts.widths) != channels or list(item.idxs) != list(item.root_idxs) \
            or sorted(item.idxs) != list(range(channels)):
        return 1, "parts that hold other channels too (the split's input is not this group's channels in order)"
    return len(parts.widths), ""


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
                    traceable_shuffles(model), out_of_place(model):
                warnings.simplefilter("ignore")
                self._graph = dependency_graph_type()().build_dependency(
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
        self._whole_conv_groups: dict[int, WholeConvGroups] = {}
        self._merge_conv_groups()
        self._pruned = False

    def _merge_conv_groups(self) -> None:
        """A grouped conv (not depthwise) that reads one prunable group and writes another loses whole conv groups:
        the two become one group whose blocks are the conv's group width. Removing the same positions from every
        conv group instead (what the two groups alone allow) leaves widths that runtimes' grouped kernels handle
        badly: RegNetY-800MF, 16 channels a group, pruned that way to 0.7 of its MACs ran no faster on onnxruntime,
        where its own narrower variant (fewer groups of 16) ran 1.35x faster."""
        of_member = {(m.layer, m.dim): g for g in self.groups if g.prunable for m in g.members}
        merged: dict[int, ChannelGroup] = {}
        gone: set[int] = set()
        for name, conv in self.model.named_modules():
            if not _grouped_conv(conv) or conv.transposed or conv.in_channels != conv.out_channels:
                continue
            inputs, outputs = of_member.get((name, "in")), of_member.get((name, "out"))
            if inputs is None or outputs is None or inputs is outputs \
                    or {inputs.index, outputs.index} & (gone | set(merged)):
                continue
            members = (*inputs.members, *outputs.members)
            if inputs.blocks != conv.groups or outputs.blocks != conv.groups \
                    or any(m.layer != name and _channel_blocks(self.module(m.layer)) > 1 for m in members):
                continue  # another grouped layer (a GroupNorm, a second grouped conv) has its own blocks
            inputs_at = _conv_group_positions(inputs, name, "in", conv.groups)
            outputs_at = _conv_group_positions(outputs, name, "out", conv.groups)
            if inputs_at is None or outputs_at is None:
                continue
            merged[inputs.index] = ChannelGroup(
                inputs.index, inputs.root, conv.out_channels, conv.out_channels // conv.groups,
                tuple(Member(m.layer, m.dim, m.indices, tuple(at[r] for r in m.root_indices))
                      for group, at in ((inputs, inputs_at), (outputs, outputs_at)) for m in group.members),
                True, grouped_conv=name)
            gone.add(outputs.index)
            self._whole_conv_groups[inputs.index] = WholeConvGroups(name, inputs, outputs, inputs_at, outputs_at)
        kept = [merged.get(g.index, g) for g in self.groups if g.index not in gone]
        self.groups = [dataclasses.replace(g, index=i) for i, g in enumerate(kept)]  # numbered 0..n-1, as before
        self._whole_conv_groups = {i: self._whole_conv_groups[g.index] for i, g in enumerate(kept)
                                   if g.index in self._whole_conv_groups}

    def _note_outputs(self, output):
        """Remember where the traced output tensors come from: a group whose channels reach one of them must keep
        its width even when other layers read it too (an FPN level that also feeds P6, an SSD feature map that the
        backbone goes on from)."""
        self._output_grad_fns = {t.grad_fn for t in output_tensors(output) if t.grad_fn is not None}
        return output

    def _describe(self, index: int, raw, ignore: Sequence[str]) -> ChannelGroup:
        members, blocks, split, ambiguous, through_split = [], 1, "", False, False
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
            if name is None:  # a traced op (add, concat, reshape, split) or a shuffle's stand-in, not a layer
                parts, held = _split_blocks(item, len(raw[0].idxs))
                blocks, split, through_split = math.lcm(blocks, parts), split or held, through_split or parts > 1
                shuffled = shuffled or isinstance(module, ShuffleStandIn)
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
            reason = (f"its channels spread {exc} through reshapes read as flattens" if isinstance(exc, SpreadTooFar) else
                      f"passes through a {type(op.module).__name__.strip('_').removesuffix('Op').lower()} whose channel "
                      f"mapping cannot be inferred ({type(exc).__name__}: {first_line(exc, 60)})")
        elif ignored is not None:
            reason = f"ignored ({ignored})"
        elif shuffled:  # before the outputs: the stand-in that reads the group is no consumer of the model's
            reason = SHUFFLE
        elif feeds_output or not consumers:
            reason = "feeds the model output"
        elif split:
            reason = f"split into {split}"
        elif through_split and any(_grouped_conv(self.module(m.layer)) for m in members):
            # Res2NeXt: each part feeds a grouped conv, and the removal misplaces the positions within its groups
            reason = "split into parts that grouped convolutions read"
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

    def _remove(self, root_layer: str, positions, keeping_inputs_of: nn.Module | None = None) -> None:
        """Torch-Pruning's removal of one group's root positions; ``keeping_inputs_of``: a layer whose input channels
        are left to the caller."""
        root = self.module(root_layer)
        pruner = self._graph.get_pruner_of_module(root)
        items = self._graph.get_pruning_group(root, pruner.prune_out_channels, sorted(int(p) for p in positions))
        if not self._graph.check_pruning_group(items):
            raise ArchitectureError(f"removing {len(positions)} channels would empty a layer in group {root_layer}")
        items._group = [item for item in items._group if item.dep.target.module is not keeping_inputs_of
                        or self._graph.is_out_channel_pruning_fn(item.dep.handler)]
        try:
            items.prune(record_history=False)
        except Exception as exc:  # a layer type whose removal Torch-Pruning gets wrong
            raise ArchitectureError(
                f"Torch-Pruning cannot remove channels of group {root_layer} ({type(exc).__name__}: "
                f"{first_line(exc, 120)}); this architecture is not supported for pruning"
            ) from exc

    def _remove_conv_groups(self, whole: WholeConvGroups, positions: set[int]) -> None:
        """Remove whole conv groups of ``whole.conv`` (merged positions): from the group it reads, all but its own
        input channels (a conv group's weights read only its own inputs, so its weight's input dim stays); from the
        group it writes, its output rows with the rest; then its groups and input count."""
        conv = self.module(whole.conv)
        groups, width = conv.groups, conv.out_channels // conv.groups
        lost = {p % groups for p in positions}
        if positions != {i * groups + q for q in lost for i in range(width)}:
            raise ArchitectureError(f"{whole.conv} can lose only whole conv groups of {width} channels")
        self._remove(whole.inputs.root, [r for r, p in whole.inputs_at.items() if p in positions], keeping_inputs_of=conv)
        self._remove(whole.outputs.root, [r for r, p in whole.outputs_at.items() if p in positions])
        conv.groups = groups - len(lost)
        conv.in_channels = conv.groups * (conv.in_channels // groups)

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
            if index in self._whole_conv_groups:
                self._remove_conv_groups(self._whole_conv_groups[index], {int(p) for p in positions})
            else:
                self._remove(group.root, positions)
        for module in self.model.modules():
            sync = ATTRIBUTE_SYNC.get(f"{type(module).__module__}.{type(module).__qualname__}")
            if sync is not None:
                sync(module)
