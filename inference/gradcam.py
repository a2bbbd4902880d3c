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
    return {
        c: F.interpolate(
            torch.stack(m).mean(0)[:, None], size=(size, size), mode="bilinear", align_corners=False
        )[:, 0]
        for c, m in maps.items()
    }


def _normalise(cam: torch.Tensor) -> torch.Tensor:
    """Each slice's map scaled to a peak of 1 (a flat map stays 0)."""
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-8)[:, None, None]
    return cam / peak
