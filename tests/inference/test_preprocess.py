import numpy as np
import pytest
import torch

from inference.constants import AIR_HU
from inference.preprocess import (
    BONE,
    BRAIN,
    SUBDURAL,
    InplaneTransform,
    PreprocessConfig,
    Window,
    apply_windows,
    clip_to_window,
    hu_from_windowed,
    model_input,
    neighbour_slices,
    resample_inplane,
    resample_mask,
    to_original,
)


def test_the_default_windows_are_the_papers() -> None:
    assert (BRAIN.level, BRAIN.width) == (40, 80)
    assert (SUBDURAL.level, SUBDURAL.width) == (80, 200)
    assert (BONE.level, BONE.width) == (600, 2800)


def test_window_arithmetic_matches_hand_computed_values() -> None:
    hu = torch.tensor([[-1000.0, 0.0, 40.0, 60.0, 80.0, 200.0, 2000.0]])
    windowed = apply_windows(hu, (BRAIN, SUBDURAL, BONE))  # (3, 1, 7)
    # brain 40/80 spans 0..80 HU
    assert windowed[0, 0].tolist() == pytest.approx([0, 0, 0.5, 0.75, 1, 1, 1])
    # subdural 80/200 spans -20..180 HU
    assert windowed[1, 0].tolist() == pytest.approx([0, 0.1, 0.3, 0.4, 0.5, 1, 1])
    # bone 600/2800 spans -800..2000 HU
    assert windowed[2, 0, 1].item() == pytest.approx(800 / 2800)
    assert windowed[2, 0, 6].item() == pytest.approx(1.0)


def test_a_windowed_picture_inverts_to_the_windows_range() -> None:
    picture = np.array([[0, 51, 255]], dtype=np.uint8)
    assert hu_from_windowed(picture, BRAIN)[0].tolist() == pytest.approx([0.0, 16.0, 80.0])


def test_clipping_full_range_ct_gives_what_a_windowed_picture_holds() -> None:
    hu = torch.tensor([-1000.0, 30.0, 1500.0])
    assert clip_to_window(hu, BRAIN).tolist() == [0.0, 30.0, 80.0]


def test_the_clipping_augmentation_imitates_the_window_of_the_models_own_pictures() -> None:
    """Training clips full-range CT the way the model's windowed pictures were saved
    (``windowed_source``), not always in the default brain window."""
    from inference.data import Augment, Volume, slice_input

    hu = torch.linspace(-1000, 1500, 16 * 16).reshape(1, 16, 16).half()
    volume = Volume(
        key="s", patient_id="p", hu=hu, positions_mm=np.zeros(1),
        slice_labels=np.zeros((1, 6), np.float32), study_labels=np.zeros(6, np.float32),
        masks=None, windowed_source=False, source="phantom",
    )  # fmt: skip
    only_clip = Augment(
        clip_window_prob=1.0, flip_prob=0.0, max_rotation_deg=0.0, max_scale=0.0,
        max_shift=0.0, noise_hu=0.0,
    )  # fmt: skip
    wide = Window(100, 400)  # -100 to 300 HU
    config = PreprocessConfig(image_size=16, windows=(wide,), interpolation_degree=0.0,
                              windowed_source=wide)  # fmt: skip
    x, _ = slice_input(volume, 0, config, only_clip)
    seen = x[0] * wide.width + wide.low  # back to HU through the one channel
    assert float(seen.min()) == pytest.approx(-100, abs=1) and float(seen.max()) > 290
    x, _ = slice_input(volume, 0, PreprocessConfig(image_size=16, windows=(wide,),
                       interpolation_degree=0.0), only_clip)  # fmt: skip
    assert float((x[0] * wide.width + wide.low).max()) == pytest.approx(BRAIN.high, abs=1)


def test_neighbours_are_found_by_position_not_by_index() -> None:
    volume = torch.tensor([0.0, 10.0, 20.0, 30.0])[:, None]  # values = positions * 2
    positions = np.array([0.0, 5.0, 10.0, 15.0])
    below, above = neighbour_slices(volume, positions, distance_mm=2.5)
    assert below[:, 0].tolist() == pytest.approx([0.0, 5.0, 15.0, 25.0])
    assert above[:, 0].tolist() == pytest.approx([5.0, 15.0, 25.0, 30.0])


def test_uneven_gaps_interpolate_between_the_real_neighbours() -> None:
    volume = torch.tensor([0.0, 10.0, 100.0])[:, None]
    positions = np.array([0.0, 1.0, 10.0])
    below, above = neighbour_slices(volume, positions, distance_mm=5.0)
    assert above[1, 0].item() == pytest.approx(10.0 + (100 - 10) * 5 / 9)
    assert below[2, 0].item() == pytest.approx(10.0 + (100 - 10) * 4 / 9)


def test_the_border_slices_repeat_themselves_instead_of_inventing_anatomy() -> None:
    volume = torch.tensor([1.0, 2.0, 3.0])[:, None]
    below, above = neighbour_slices(volume, np.array([0.0, 5.0, 10.0]), distance_mm=5.0)
    assert below[0, 0].item() == 1.0
    assert above[2, 0].item() == 3.0


def test_the_model_input_blends_each_slice_with_its_neighbours_by_the_degree() -> None:
    hu = torch.tensor([0.0, 80.0, 0.0])[:, None, None]  # brain window 40/80: 0, 1, 0
    config = PreprocessConfig(windows=(BRAIN,), interpolation_degree=0.5, context_mm=5.0)
    blended = model_input(hu, np.array([0.0, 5.0, 10.0]), config)
    assert blended[:, 0, 0, 0].tolist() == pytest.approx([0.25, 0.5, 0.25])


def test_the_model_input_in_chunks_equals_the_whole_volume_at_once() -> None:
    rng = np.random.default_rng(0)
    hu = torch.from_numpy(rng.uniform(-200, 300, (41, 8, 8)).astype(np.float32))
    positions = np.cumsum(np.r_[0.0, rng.uniform(1.0, 6.0, 40)])  # uneven gaps
    config = PreprocessConfig(interpolation_degree=0.25, context_mm=5.0)
    whole = model_input(hu, positions, config, chunk=len(hu))
    for chunk in (1, 4, 32):  # chunk borders fall inside the volume; neighbours cross them
        assert torch.equal(model_input(hu, positions, config, chunk=chunk), whole)


def test_prediction_builds_each_slice_exactly_as_training_does_at_any_spacing() -> None:
    """Neighbours are interpolated in HU and windowed after, in both. Windowing first would
    differ wherever a neighbour falls between real slices: here every gap is uneven and the
    values cross the windows' bounds."""
    from inference.data import Volume, slice_input

    rng = np.random.default_rng(1)
    hu = torch.from_numpy(rng.uniform(-300, 900, (9, 8, 8)).astype(np.float32)).half()
    positions = np.cumsum(np.r_[0.0, rng.uniform(0.6, 4.0, 8)])
    config = PreprocessConfig(image_size=8, interpolation_degree=0.25, context_mm=5.0)
    volume = Volume(
        key="s", patient_id="p", hu=hu, positions_mm=positions,
        slice_labels=np.zeros((9, 6), np.float32), study_labels=np.zeros(6, np.float32),
        masks=None, windowed_source=False, source="phantom",
    )  # fmt: skip
    predicted = model_input(hu.float(), positions, config)
    trained = torch.stack([slice_input(volume, i, config, None)[0] for i in range(9)])
    torch.testing.assert_close(predicted, trained, rtol=0, atol=1e-6)
    single = model_input(hu[:1].float(), positions[:1], config)  # one slice: itself as context
    torch.testing.assert_close(single, apply_windows(hu[:1].float(), config.windows))


def _disc(size: int, radius_px: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius_px**2
    return np.where(inside, 40.0, AIR_HU).astype(np.float32)[None]


def test_scans_of_different_pixel_size_show_the_head_at_the_same_scale() -> None:
    config = PreprocessConfig(image_size=128, spacing_mm=2.0)
    fine, _ = resample_inplane(_disc(512, 200), (0.45, 0.45), config)  # 90 mm radius
    coarse, _ = resample_inplane(_disc(256, 200 * 0.45 / 0.9), (0.9, 0.9), config)
    fine_area = (fine > -500).sum().item()
    coarse_area = (coarse > -500).sum().item()
    expected = np.pi * (90 / 2.0) ** 2
    assert fine_area == pytest.approx(expected, rel=0.05)
    assert coarse_area == pytest.approx(expected, rel=0.05)


def test_non_square_pixels_are_scaled_along_each_axis_by_their_own_spacing() -> None:
    """A round head stored with 0.5 mm rows and 1.0 mm columns is an ellipse in pixels (twice
    as tall as wide); on the model grid it is round again, and maps back where it was."""
    height, width = 400, 200
    yy, xx = np.mgrid[:height, :width]
    ellipse = ((yy - height / 2) / 160) ** 2 + ((xx - width / 2) / 80) ** 2 < 1  # 80 mm radius
    hu = np.where(ellipse, 40.0, AIR_HU).astype(np.float32)[None]
    config = PreprocessConfig(image_size=128, spacing_mm=2.0)
    grid, transform = resample_inplane(hu, (0.5, 1.0), config)
    head = (grid[0] > -500).numpy()
    rows, cols = np.nonzero(head)
    assert np.ptp(rows) == pytest.approx(80, abs=2) and np.ptp(cols) == pytest.approx(80, abs=2)
    assert head.sum() == pytest.approx(np.pi * 40**2, rel=0.05)
    back = to_original(torch.from_numpy(head[None]).float(), transform)[0].numpy() > 0.5
    assert (back & ellipse).sum() / ellipse.sum() > 0.95
    square = resample_inplane(hu, (0.7, 0.7), config)[1]  # square pixels: one scale, as before
    assert square.col_scale == square.scale == pytest.approx(0.35)


def test_outside_the_original_image_is_air() -> None:
    config = PreprocessConfig(image_size=64, spacing_mm=4.0)
    grid, _ = resample_inplane(np.full((1, 32, 32), 40.0, np.float32), (1.0, 1.0), config)
    assert grid[0, 0, 0].item() == pytest.approx(AIR_HU)
    assert grid[0, 32, 32].item() == pytest.approx(40.0)


def test_a_heatmap_maps_back_onto_the_original_slice_where_the_head_was() -> None:
    hu = _disc(256, 40)
    hu[0, :, :] = np.roll(hu[0], (30, -20), axis=(0, 1))  # head off-centre
    config = PreprocessConfig(image_size=96, spacing_mm=1.0)
    grid, transform = resample_inplane(hu, (0.8, 0.8), config)
    back = to_original((grid > -500).float(), transform)[0].numpy() > 0.5
    original = hu[0] > -500
    overlap = (back & original).sum() / original.sum()
    assert overlap > 0.95


@pytest.mark.parametrize("scale", [0.3, 1.0, 1.4])
def test_mask_bits_resample_like_every_plane_resampled_alone(scale: float) -> None:
    """resample_mask skips the slices where a bit is empty: the result must be what resampling
    each bit plane of every slice gives, as a 0/1 image through the same bilinear sampling."""
    rng = np.random.default_rng(1)
    mask = np.zeros((6, 120, 100), np.uint8)
    mask[1, 30:70, 20:60] = 0b11  # two classes in one blob
    mask[2, 5:7, 10:90] = 1 << 4  # a thin line
    mask[4] = rng.integers(0, 256, (120, 100), dtype=np.uint8)  # every bit, noise
    mask[5, 60, 50] = 1 << 7  # one pixel
    transform = InplaneTransform(scale, 4.0, -3.0, (120, 100))
    got = resample_mask(mask, transform, 64)
    for bit in range(8):
        plane = ((mask >> bit) & 1).astype(np.float32)  # every slice, as a 0/1 image, air 0
        expected = _resampled_plane(plane, transform, 64) > 0.5
        assert np.array_equal((got >> bit) & 1, expected.astype(np.uint8)), bit
    assert got[0].max() == 0 and got[3].max() == 0  # empty slices stay empty
    assert (got[1] & 0b11 == 0b11).sum() > 100


def _resampled_plane(plane: np.ndarray, transform: InplaneTransform, size: int) -> np.ndarray:
    from inference.preprocess import _sample

    return _sample(torch.from_numpy(plane), transform, size, air=0.0).numpy()


def test_windows_round_trip_through_the_stored_configuration() -> None:
    config = PreprocessConfig(windows=(Window(50, 100), Window(50, 130), BONE))
    assert PreprocessConfig.from_dict(config.to_dict()) == config


def test_a_picture_with_jpeg_noise_in_its_background_is_scaled_by_its_head() -> None:
    """A windowed JPEG's black background holds grey 0-2, not only 0: a head 300 of 640 px
    across must fill head_extent_mm on the grid, not the whole picture's noise."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 3, (640, 640)).astype(np.uint8)  # background noise 0-2
    yy, xx = np.mgrid[:640, :640]
    grey[(yy - 320) ** 2 + (xx - 300) ** 2 < 150**2] = 140  # the head, off centre by 20 px
    hu = hu_from_windowed(grey, BRAIN)[None]
    config = PreprocessConfig(image_size=192, spacing_mm=1.25, head_extent_mm=180.0)
    grid, transform = resample_inplane(hu, None, config)
    head = (grid[0] > BRAIN.low + 0.25 * BRAIN.width).numpy()
    cols = np.flatnonzero(head.any(axis=0))
    # 144 px across, within the 1st-99th percentile bounds' own bias (a disc comes out ~7% wider)
    assert cols[-1] - cols[0] + 1 == pytest.approx(180 / 1.25, rel=0.1)
    assert (cols[0] + cols[-1]) / 2 == pytest.approx(95.5, abs=2)  # centred on the head
    # a package saved before the margin was a setting reads pictures as it was trained: any
    # grey above the floor is head, so the noise sets the scale
    old = PreprocessConfig.from_dict(
        {k: v for k, v in config.to_dict().items() if k != "windowed_head_margin"}
    )
    assert old.windowed_head_margin == 0.0
    assert resample_inplane(hu, None, old)[1].scale < 0.8 * transform.scale
