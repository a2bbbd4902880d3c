import numpy as np
import pytest
import torch

from inference.convexity import (
    ConvexityNet,
    StripConfig,
    convexity_strips,
    neighbours,
    strip_channels,
)

SPACING = (0.5, 0.5)
SIZE = 400  # 200 mm field, head centre in the middle
INNER_MM, OUTER_MM = 80.0, 86.0
SUBDURAL_BIT = 1 << 2
SUBARACHNOID_BIT = 1 << 4


def _polar() -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    dy, dx = (rows - (SIZE - 1) / 2) * SPACING[0], (cols - (SIZE - 1) / 2) * SPACING[1]
    return np.hypot(dx, dy), np.degrees(np.arctan2(dy, dx)) % 360


def _head(blood_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Brain inside a skull ring, with a band of blood along the inner table at 0-60 degrees."""
    radius, angle = _polar()
    hu = np.full((SIZE, SIZE), -1000.0, np.float32)
    hu[radius < OUTER_MM + 4] = 40.0  # scalp
    hu[radius < OUTER_MM] = 1200.0
    hu[radius < INNER_MM] = 30.0
    blood = (radius < INNER_MM) & (radius >= INNER_MM - blood_mm) & (angle < 60)
    hu[blood] = 70.0
    masks = np.where(blood, SUBDURAL_BIT, 0).astype(np.uint8)
    return hu[None], masks[None]


def test_row_zero_of_the_strip_touches_the_inner_table():
    hu, _ = _head()
    strips = convexity_strips(hu, SPACING)
    assert strips.valid.all()
    profile = strips.hu[0, :, 180]  # a ray through plain brain, (D,)
    assert np.allclose(profile[1:], 30.0, atol=1.0)
    assert profile[0] < 1200.0  # partial volume with bone at most, never the bone itself


def test_the_blood_band_fills_the_rows_of_its_thickness_at_its_angles():
    hu, _ = _head(blood_mm=3.0)
    strips = convexity_strips(hu, SPACING)
    rays_in_blood = strips.hu[0, 1:4, 10:50]  # 0.5-2 mm deep, 10-50 degrees
    rays_in_brain = strips.hu[0, 1:4, 100:340]
    assert np.allclose(rays_in_blood, 70.0, atol=1.0)
    assert np.allclose(rays_in_brain, 30.0, atol=1.0)
    assert np.allclose(strips.hu[0, 8:, 10:50], 30.0, atol=1.0)  # below the band: brain again


def test_sector_labels_follow_the_mask():
    hu, masks = _head()
    strips = convexity_strips(hu, SPACING, masks=masks)
    assert strips.labels is not None
    subdural, epidural = strips.labels[0]
    assert subdural[2:58].all() and not subdural[62:358].any()
    assert not epidural.any()


def test_a_calcification_nearer_the_centre_does_not_stop_the_ray():
    hu, _ = _head()
    radius, angle = _polar()
    hu[0][(np.abs(radius - 40) < 2) & (np.abs(angle - 180) < 3)] = 900.0
    strips = convexity_strips(hu, SPACING)
    assert np.allclose(strips.hu[0, 1:20, 180], 30.0, atol=1.0)


def test_a_slice_without_skull_gives_invalid_rays_of_air():
    hu = np.full((1, SIZE, SIZE), -1000.0, np.float32)
    strips = convexity_strips(hu, SPACING)
    assert not strips.valid.any()
    assert (strips.hu == -1000.0).all()


def test_a_ray_whose_skull_starts_too_near_the_centre_is_invalid():
    hu, _ = _head()
    strips = convexity_strips(hu, SPACING, StripConfig(min_inner_radius_mm=INNER_MM + 1))
    assert not strips.valid.any()


def test_channels_take_neighbours_by_position_and_clamp_at_the_borders():
    strips = torch.stack([torch.full((4, 8), v) for v in (0.0, 55.0, 100.0)])
    below, above = (torch.from_numpy(i) for i in neighbours(3))
    x = strip_channels(strips, torch.arange(3), below, above)  # (N, 4, D, A)
    own = x[:, 1, 0, 0]
    assert torch.allclose(own, torch.tensor([10 / 110, 65 / 110, 1.0]))
    assert torch.allclose(x[:, 0, 0, 0], own[[0, 0, 1]])
    assert torch.allclose(x[:, 2, 0, 0], own[[1, 2, 2]])


@pytest.mark.parametrize("shift", [8, 96])
def test_the_net_turns_with_the_head(shift):
    torch.manual_seed(0)
    net = ConvexityNet(width=4).eval()
    x = torch.rand(2, 4, 64, 360)
    turned = net(torch.roll(x, shift, dims=-1))  # (2, 2, 45)
    assert turned.shape == (2, 2, 45)
    assert torch.allclose(turned, torch.roll(net(x), shift // 8, dims=-1), atol=1e-5)


def test_a_reader_of_sulcal_blood_labels_it_from_its_own_bit():
    hu, masks = _head()
    radius, angle = _polar()
    sulcus = (np.abs(angle - 200) < 2) & (radius < INNER_MM - 4) & (radius > INNER_MM - 14)
    masks[0][sulcus] |= SUBARACHNOID_BIT
    classes = ("subdural", "epidural", "subarachnoid")
    strips = convexity_strips(hu, SPACING, masks=masks, classes=classes)
    assert strips.labels is not None and strips.labels.shape == (1, 3, 360)
    subdural, epidural, subarachnoid = strips.labels[0]
    assert subdural[2:58].all() and not epidural.any()
    assert subarachnoid[199:202].all() and subarachnoid.sum() <= 6
    net = ConvexityNet(width=4, classes=classes).eval()
    assert net(torch.rand(1, 4, 64, 360)).shape == (1, 3, 45)


@pytest.mark.parametrize("classes", [(), ("intraparenchymal",), ("subdural", "subdural")])
def test_the_strips_refuse_a_class_they_cannot_hold(classes):
    with pytest.raises(ValueError, match="the strips read"):
        ConvexityNet(width=4, classes=classes)
