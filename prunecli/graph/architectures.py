"""What prunecli knows of particular architectures: those it refuses at once, the widths some keep in attributes
(set again after every removal), and, for a forward that still breaks, the module to hold."""

from __future__ import annotations

import torch
from torch import nn

from prunecli.errors import ArchitectureError

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
def _sync_vision_transformer(model: nn.Module) -> None:
    model.hidden_dim = model.conv_proj.out_channels


def _sync_metaformer_scale(scale: nn.Module) -> None:  # timm's layer and residual scales reshape by ``shape``
    scale.shape = (scale.scale.shape[0], *scale.shape[1:])


def _sync_cross_stage(stage: nn.Module) -> None:  # timm's CSP stages split conv_exp's output by ``expand_chs // 2``
    stage.expand_chs = stage.conv_exp.conv.out_channels


def _sync_res2net(block: nn.Module) -> None:  # timm's Res2Net splits conv1's output into parts of ``width``
    block.width = block.conv1.out_channels // block.scale


def _sync_split_halves(block: nn.Module) -> None:  # Ultralytics' C2f family: chunk(2) runs, but forward_split
    block.c = block.cv1.conv.out_channels // 2    # (what its exporter switches to) splits by ``(c, c)``


ATTRIBUTE_SYNC = {"torchvision.models.vision_transformer.VisionTransformer": _sync_vision_transformer,
                  "timm.models.metaformer.Scale": _sync_metaformer_scale,
                  "timm.models.cspnet.CrossStage": _sync_cross_stage,
                  "timm.models.cspnet.CrossStage3": _sync_cross_stage,
                  "timm.models.res2net.Bottle2neck": _sync_res2net,
                  **{f"ultralytics.nn.modules.block.{name}": _sync_split_halves
                     for name in ("C2f", "C3k2", "C2fCIB", "C2fPSA", "C2fAttn", "RepNCSPELAN4")}}


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
