"""The attention loss and the outlines it reads (fast: no training run)."""

import math

import numpy as np
import torch

from inference.training import TrainConfig, class_outlines, localisation_loss, operating_points


def test_outlines_unpack_the_subtype_bits_and_any_is_their_union() -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[1, 1] = 1 << 2  # subdural
    mask[5, 6] = (1 << 0) | (1 << 4)  # intraparenchymal and subarachnoid
    planes = class_outlines(mask, 8)
    assert planes.shape == (6, 8, 8) and planes.dtype == torch.bool
    assert planes[3, 1, 1] and planes[1, 5, 6] and planes[5, 5, 6]
    assert int(planes[1:].sum()) == 3
    assert torch.equal(planes[0], planes[1:].any(0))
    assert not class_outlines(None, 8).any()


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    outlines = torch.zeros(1, 6, 64, 64, dtype=torch.bool)
    outlines[0, 0, 30:34, 30:34] = True  # around the centre of location (2, 2) at stride 16
    labels = torch.tensor([[1.0, 0, 0, 0, 0, 0]])
    return outlines, labels


def test_the_loss_is_low_when_the_evidence_peaks_on_the_bleed_and_high_elsewhere() -> None:
    outlines, labels = _case()
    flat = torch.zeros(1, 6, 4, 4)
    assert math.isclose(
        float(localisation_loss(flat, outlines, labels)), math.log(16), rel_tol=1e-5
    )
    on = flat.clone()
    on[0, 0, 2, 2] = 10.0
    off = flat.clone()
    off[0, 0, 0, 0] = 10.0
    assert float(localisation_loss(on, outlines, labels)) < 0.01
    assert float(localisation_loss(off, outlines, labels)) > 9.0


def test_the_loss_ignores_negative_classes_unknown_labels_and_unoutlined_slices() -> None:
    outlines, _ = _case()
    maps = torch.randn(1, 6, 4, 4, requires_grad=True)
    for labels in (torch.zeros(1, 6), torch.full((1, 6), float("nan"))):
        loss = localisation_loss(maps, outlines, labels)
        assert float(loss) == 0.0
        loss.backward()  # still part of the graph
    assert float(localisation_loss(maps, torch.zeros_like(outlines), _case()[1])) == 0.0


def test_the_loss_is_blind_to_how_much_evidence_there_is() -> None:
    """A softmax: shifting every location's evidence leaves it unchanged, so it never fights the
    classification loss over the slice logit."""
    outlines, labels = _case()
    maps = torch.randn(1, 6, 4, 4)
    assert torch.allclose(
        localisation_loss(maps, outlines, labels), localisation_loss(maps + 5.0, outlines, labels)
    )


def test_operating_points_reach_the_target_sensitivity_on_validation() -> None:
    rng = np.random.default_rng(0)
    labels = np.tile((rng.random(200) < 0.4).astype(np.float32)[:, None], (1, 6))
    probabilities = np.clip(labels * 0.3 + rng.random((200, 6)) * 0.7, 0, 1)
    thresholds = operating_points(probabilities, labels, TrainConfig(target_sensitivity=0.95))
    for i in range(6):
        positive = labels[:, i] == 1
        assert (probabilities[positive, i] >= thresholds[i]).mean() >= 0.95
