"""The pointing game's geometry: distances from the attention peak to the class's blood and to
other subtypes' blood, on the phantom masks' subtype bit flags."""

import numpy as np

from inference.evaluation import ALL_SUBTYPE_BITS, peak_distances
from inference.phantom import _BIT


def _slice() -> np.ndarray:
    mask = np.zeros((64, 64), np.uint8)
    mask[10:14, 40:44] |= _BIT["epidural"]
    mask[40:50, 5:8] |= _BIT["subdural"]
    return mask


def test_a_peak_on_the_class_is_at_distance_zero_and_the_other_bleed_is_measured() -> None:
    heatmap = np.zeros((64, 64))
    heatmap[12, 42] = 1.0
    to_class, to_other = peak_distances(heatmap, _slice(), _BIT["epidural"])
    assert to_class == 0.0
    assert to_other == np.hypot(40 - 12, 42 - 7)


def test_a_peak_on_another_subtype_is_far_from_the_class_and_on_the_other_bleed() -> None:
    heatmap = np.zeros((64, 64))
    heatmap[45, 6] = 1.0
    to_class, to_other = peak_distances(heatmap, _slice(), _BIT["epidural"])
    assert to_class == np.hypot(45 - 13, 40 - 6)
    assert to_other == 0.0


def test_without_other_blood_there_is_no_other_distance_and_any_covers_every_subtype() -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[3:6, 3:6] |= _BIT["subarachnoid"]
    heatmap = np.zeros((32, 32))
    heatmap[20, 20] = 1.0
    to_class, to_other = peak_distances(heatmap, mask, _BIT["subarachnoid"])
    assert to_class == np.hypot(20 - 5, 20 - 5)
    assert to_other is None
    to_any, to_other_any = peak_distances(heatmap, _slice(), ALL_SUBTYPE_BITS)
    assert to_any == np.hypot(20 - 13, 40 - 20)  # the epidural corner is nearer than the subdural
    assert to_other_any is None


def test_the_chance_area_does_not_wrap_around_the_image_edge() -> None:
    from inference.evaluation import _dilate

    corner = np.zeros((10, 10), bool)
    corner[0, 0] = True
    grown = _dilate(corner, 2)
    assert grown[:3, :3].all() and grown.sum() == 9  # not the far rows and columns too
