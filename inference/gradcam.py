"""Grad-CAM (Selvaraju et al. 2017) at the last convolutional stage, per class, up-sampled."""

import torch
import torch.nn.functional as F

from inference.models import EfficientNetLite


def grad_cam(
    members: list[EfficientNetLite],
    features: list[torch.Tensor],
    class_indices: list[int],
    size: int,
) -> dict[int, torch.Tensor]:
    """Attention maps (B, size, size) in [0, 1] per class, averaged over the ensemble.

    ``features`` are each member's last-stage maps (B, E, h, w) from ``forward_features``; only
    the head is differentiated, so this costs little more than the forward pass.
    """
    maps: dict[int, list[torch.Tensor]] = {c: [] for c in class_indices}
    for model, stage in zip(members, features, strict=True):
        stage = stage.detach().float().requires_grad_(True)
        with torch.enable_grad():
            logits = model.forward_head(stage)  # (B, 6)
            for c in class_indices:
                (gradient,) = torch.autograd.grad(logits[:, c].sum(), stage, retain_graph=True)
                weights = gradient.mean(dim=(2, 3), keepdim=True)  # (B, E, 1, 1)
                cam = torch.relu((weights * stage).sum(dim=1))  # (B, h, w)
                maps[c].append(_normalise(cam.detach()))
    stride = members[0].output_stride
    return {c: upsample(torch.stack(m).mean(0), size, stride) for c, m in maps.items()}


def class_activation(
    members: list[EfficientNetLite], maps: list[torch.Tensor], class_index: int, size: int
) -> torch.Tensor:
    """The same Grad-CAM in closed form, from each member's ``forward_maps`` (B, 6, h, w).

    With global average pooling and a linear head, d logit_c / d A_k(i, j) = w_ck / (h w) at every
    location, so Grad-CAM's channel weights are w_c / (h w) and its map is
    ReLU(sum_k w_ck A_k) / (h w) = ReLU(map_c - bias_c) / (h w). Normalised per slice the factor
    goes, so no backward pass is needed (tests check it equals ``grad_cam``).
    """
    cams = []
    for model, class_maps in zip(members, maps, strict=True):
        bias = float(model.fc.bias[class_index].detach())
        cam = torch.relu(class_maps[:, class_index].float() - bias)
        cams.append(_normalise(cam))
    return upsample(torch.stack(cams).mean(0), size, members[0].output_stride)


def upsample(cam: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """(B, h, w) -> (B, size, size). With zero-padded odd kernels, feature i of a stride-s stage
    is centred on input pixel s * i, so input pixel p reads feature p / s (also where s does not
    divide ``size`` and h = ceil(size / s): p * h / size would shift the map there)."""
    batch, height, width = cam.shape
    rows = torch.arange(size, dtype=torch.float32) / stride  # feature coordinate of p
    cols = torch.arange(size, dtype=torch.float32) / stride
    grid_y = 2 * rows / max(height - 1, 1) - 1
    grid_x = 2 * cols / max(width - 1, 1) - 1
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)
    return F.grid_sample(
        cam[:, None].float(),
        grid.expand(batch, size, size, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )[:, 0]


def _normalise(cam: torch.Tensor) -> torch.Tensor:
    """Each slice's map scaled to a peak of 1 (a flat map stays 0)."""
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-8)[:, None, None]
    return cam / peak
