"""Ultralytics YOLO models: the part prunecli traces and prunes, and what of the head stays as it is.

An Ultralytics model (``DetectionModel``, ``SegmentationModel``, ``PoseModel``, ``OBBModel``,
``ClassificationModel``, of YOLOv8, YOLO11, YOLO26 and the other families its yaml files build) is a
``Sequential`` of layers, each reading the output of the layer before it or of earlier layers (``m.f``), and a head
that decodes boxes (anchors and strides, the DFL's fixed conv) and, for end-to-end heads, picks the top detections.
prunecli traces :class:`YoloPath`: the same layers, by reference, ending in the head's raw outputs (box
distributions, class scores, mask coefficients and prototypes, keypoints, angles; a classifier's logits), not in
its decoded detections. So every raw output keeps its width (classes, ``4 * reg_max``, ``nm``, keypoints, angles),
the DFL conv, which only decoding runs, is never traced nor pruned, and the anchors and strides are left alone. The
backbone, the neck and the head's inner layers prune.

A head may have layers only training runs (YOLO26's keypoint sigmas, its prototype module's semantic branch, which
reads a neck output): when traced (under autograd) the path also runs the head once more the way training does,
so those layers are coupled too and the model still trains after pruning. Costs are counted without autograd,
once, on the inference outputs.

Nothing here imports ultralytics: a model is recognised by its class's module, and its layers are called as they
are.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from prunecli.outputs import output_tensors

IMGSZ = 640  # Ultralytics' default training and prediction size (its cfg/default.yaml)
# the task models prunecli prunes (YOLOv10's checkpoints load as DetectionModel); their heads take the feature maps
# alone (YOLO-World's and YOLOE's also take text embeddings, RT-DETR's decoder the training batch)
TASK_MODELS = ("DetectionModel", "SegmentationModel", "PoseModel", "OBBModel", "ClassificationModel")


def is_ultralytics(model: nn.Module) -> bool:
    """Whether ``model`` is an Ultralytics task model (a ``BaseModel`` with its ``Sequential`` of routed layers)."""
    return (type(model).__module__.startswith("ultralytics.") and isinstance(getattr(model, "model", None), nn.Sequential)
            and hasattr(model, "save"))


def head_of(model: nn.Module) -> nn.Module:
    """The last layer of an Ultralytics model: its Detect/Segment/Pose/OBB/Classify head."""
    return model.model[-1]


@contextlib.contextmanager
def cache_kept(head: nn.Module) -> Iterator[None]:
    """The attributes a head caches for the last input size (anchors, strides, shape) put back as they were after
    the block: the file keeps what it had, whatever sizes prunecli ran the model at."""
    cached = dict(vars(head))
    try:
        yield
    finally:
        for name in set(vars(head)) - set(cached):
            delattr(head, name)
        vars(head).update({k: v for k, v in cached.items() if not k.startswith("_")})


def _norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)


class YoloPath(nn.Module):
    """An Ultralytics model from its input to its head's raw outputs.

    It holds the model's own layers (no copy, under the same attribute name ``model``), so its layer names
    (``model.2.cv1.conv``) are the checkpoint's and its state dict is the model's."""

    note = ("an Ultralytics model: backbone, neck and the head's inner layers are traced, pruned and counted up to the "
            "head's raw outputs, which keep their widths; box decoding (DFL, anchors, strides) is left alone")
    export_note = ("an Ultralytics model exports its path to the head's raw outputs (box distributions, class scores, "
                   "...): no box decoding or NMS; for those, export with Ultralytics: YOLO(MODEL).export(format='onnx')")

    def __init__(self, yolo: nn.Module):
        super().__init__()
        self.model = yolo.model
        self.routed = tuple(yolo.save)  # the layers whose outputs later layers read
        self.train(yolo.training)  # a new module is in training mode: the mode its caller restores would be that

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs: list[Any] = []
        layers = list(self.model)
        for layer in layers[:-1]:
            x = self._route(layer, x, outputs)
            x = layer(x)
            outputs.append(x if layer.i in self.routed else None)
        head = layers[-1]
        x = self._route(head, x, outputs)
        with cache_kept(head):
            raw = _raw(head(x), x)
            if torch.is_grad_enabled() and not head.training:  # traced: couple the layers only training runs too
                raw += [t for t in _raw(_as_in_training(head, x), x) if t.grad_fn is not None]
        return raw

    @staticmethod
    def _route(layer: nn.Module, x: Any, outputs: list[Any]) -> Any:
        if layer.f == -1:
            return x
        if isinstance(layer.f, int):
            return outputs[layer.f]
        return [x if j == -1 else outputs[j] for j in layer.f]


def _raw(out: Any, inputs: Any) -> list[torch.Tensor]:
    """The head's raw outputs: in eval mode a head returns (decoded, raw) (a classifier (probabilities, logits));
    the raw part without the feature maps it was given (``feats``), which are no output of the model."""
    if isinstance(out, tuple) and len(out) == 2:
        out = out[1]
    given = {id(t) for t in output_tensors(inputs)}
    return [t for t in output_tensors(out) if id(t) not in given]


def _as_in_training(head: nn.Module, x: Any) -> Any:
    """``head(x)`` with every module of the head but its norms in training mode (norms keep their statistics)."""
    changed = [m for m in head.modules() if not m.training and not _norm(m)]
    for module in changed:
        module.training = True
    try:
        return head(x)
    finally:
        for module in changed:
            module.training = False


def reassemble_yolo(whole: nn.Module, part: YoloPath) -> nn.Module:
    """``whole`` with the pruned layers of ``part`` in place of its own; ``whole`` is left as it was."""
    return copy.deepcopy(whole, memo={id(whole.model): part.model})


def yolo_outputs(model: nn.Module, input_shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The model's own eval forward (decoding included) on two seeded images, as a flat tensor list, with the
    head's cached anchors left as they were."""
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    images = torch.rand((2, *input_shape), generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), cache_kept(head_of(model)):
            return [t.cpu() for t in output_tensors(model(images))]
    finally:
        model.train(was_training)
