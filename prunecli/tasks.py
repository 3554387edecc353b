"""The part of a model prunecli traces, scores and prunes, by kind of model.

Classifiers, segmentation and video models are pruned whole: their forward takes a batch of images and returns
tensors. A torchvision detector takes a list of images, resizes them and ends in box decoding and NMS, which
neither the tracer nor a MACs count should see; prunecli works on its feature path (the backbone with its FPN
or SSD extras), keeps the width of every feature map the heads read (the heads, their per-anchor outputs and
the number of classes stay as they are) and puts the pruned feature path back into the detector. A Hugging Face
transformers model returns a ``ModelOutput``; prunecli works on its logits (:class:`Logits`), and writes the
transformers model itself. An Ultralytics YOLO model is pruned from its input to its head's raw outputs
(``prunecli.yolo``): backbone, neck and the head's inner layers, every raw output at its width, box decoding left
alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunecli.errors import ArchitectureError
from prunecli.outputs import output_tensors
from prunecli.yolo import YoloPath, is_ultralytics, reassemble_yolo, yolo_outputs


def _detector_types() -> tuple[type, ...]:
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    return (GeneralizedRCNN, RetinaNet, FCOS, SSD)


def is_detector(model: nn.Module) -> bool:
    return isinstance(model, _detector_types())


class FeaturePath(nn.Module):
    """A detector's backbone as a model of its own: a batch of normalised images -> its dict of feature maps.

    It holds the detector's own backbone (no copy), so its layer names (``backbone.body.conv1``) are the
    detector's and a state dict of it is part of the detector's."""

    note = ("a detector: its feature path (backbone with FPN or SSD extras) is traced, pruned and counted; the heads "
            "keep the widths they read")
    export_note = ("a detector exports its feature path (backbone with FPN or SSD extras, one output per feature "
                   "map); its heads, box decoding and NMS are not in the file")

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.backbone = detector.backbone
        self.train(detector.training)  # not a new module's training mode, which a caller restoring modes would set

    def forward(self, images: torch.Tensor):
        return self.backbone(images)


def is_transformers_model(model: nn.Module) -> bool:
    """A Hugging Face transformers model (one of the package's classes or a folder's own code), told by its base
    class without importing transformers."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__)


class Logits(nn.Module):
    """A transformers model as prunecli works on it: images in, the ``logits`` of its ``ModelOutput`` out (the
    output as it is for a model without logits: a mapping of tensors).

    It holds the model's own submodules under their own names (no copy, no prefix), so its layer names and state
    dict are the model's; the model itself is kept outside the module tree, and a deep copy of this view copies it
    with its submodules shared."""

    note = None
    export_note = None

    def __init__(self, model: nn.Module):
        super().__init__()
        if next(model.parameters(recurse=False), None) is not None or next(model.buffers(recurse=False), None) is not None:
            raise ArchitectureError(f"{type(model).__name__} holds tensors outside its submodules, which prunecli "
                                    "does not prune")
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["model"] = model  # not a submodule: its submodules are this view's
        self.training = model.training

    def train(self, mode: bool = True) -> Logits:
        self.model.training = mode
        return super().train(mode)

    def forward(self, images: torch.Tensor):
        output = self.model(images)
        logits = output.get("logits") if hasattr(output, "get") else None
        return logits if isinstance(logits, torch.Tensor) else output


def prunable_part(model: nn.Module) -> nn.Module:
    """What prunecli works on: the model itself, a detector's feature path, a transformers model's logits, or a YOLO
    model's path to its head's raw outputs."""
    if is_ultralytics(model):
        return YoloPath(model)
    if is_detector(model):
        return FeaturePath(model)
    return Logits(model) if is_transformers_model(model) else model


def reassemble(whole: nn.Module, part: nn.Module) -> nn.Module:
    """``whole`` with ``part`` (a pruned copy of its prunable part) in place of the original; ``whole`` is left as it was."""
    if isinstance(part, Logits):
        return part.model
    if isinstance(part, YoloPath):
        return reassemble_yolo(whole, part)
    if not isinstance(part, FeaturePath):
        return part
    return copy.deepcopy(whole, memo={id(whole.backbone): part.backbone})


def _score_thresholds(model: nn.Module) -> list[tuple[nn.Module, float]]:
    """(module, threshold) of each detection score cut-off: the detector's own (RetinaNet, FCOS, SSD) or its RoI
    heads' (the R-CNNs)."""
    return [(m, m.score_thresh) for m in (model, getattr(model, "roi_heads", None)) if hasattr(m, "score_thresh")]


def end_to_end_outputs(model: nn.Module, input_shape: tuple[int, ...]) -> list[torch.Tensor] | None:
    """A detector's detections (boxes, scores, labels, ...) on two seeded images of ``input_shape`` in eval mode, as
    a flat tensor list to compare; None for other models, whose feature path is the whole model.

    The score cut-off is 0 for the check, so that a detector with untrained heads (whose class scores all fall
    below the usual 0.05) still returns a full set of boxes to compare; it is restored afterwards. An Ultralytics
    model runs its own forward (decoding included) on a batch of two such images."""
    if is_ultralytics(model):
        return yolo_outputs(model, input_shape)
    if not is_detector(model):
        return None
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(input_shape, generator=generator) for _ in range(2)]
    device = next(model.parameters()).device
    was_training, thresholds = model.training, _score_thresholds(model)
    model.eval()
    try:
        for module, _ in thresholds:
            module.score_thresh = 0.0
        with torch.no_grad():
            return [t.cpu() for t in output_tensors(model([image.to(device) for image in images]))]
    finally:
        model.train(was_training)
        for module, threshold in thresholds:
            module.score_thresh = threshold
