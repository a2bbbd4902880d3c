"""From Hounsfield units to model input: in-plane resampling, multi-window conversion, context.

Follows Lee et al. 2019: three windows of the same slice become three channels (as a radiologist
flips between brain, subdural and bone windows), and each slice is blended with its neighbours
above and below (as a radiologist scrolls back and forth), neighbours found by physical position.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from inference.constants import AIR_HU


@dataclass(frozen=True)
class Window:
    level: float
    width: float

    @property
    def low(self) -> float:
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        return self.level + self.width / 2


BRAIN = Window(40, 80)
SUBDURAL = Window(80, 200)
BONE = Window(600, 2800)


@dataclass
class PreprocessConfig:
    """Stored with every model: the same numbers at training and at prediction."""

    windows: tuple[Window, ...] = (BRAIN, SUBDURAL, BONE)
    image_size: int = 192  # model input, pixels
    spacing_mm: float = 1.25  # model input pixel size, so every scan shows the head at one scale
    interpolation_degree: float = 0.25  # weight of the neighbours in the slice blend
    context_mm: float = 5.0  # distance to the neighbours blended in
    windowed_source: Window = field(default_factory=lambda: BRAIN)  # 8-bit images' window
    head_extent_mm: float = 180.0  # assumed head length when an image has no pixel spacing
    # Of a picture's window width, how far above its floor counts as head: about 13 of 255
    # grey levels, since JPEG noise leaves a black background at grey 0-2. Packages saved
    # before it was a setting found the head at any grey above the floor (0.0) and read
    # pictures so still, as they were trained.
    windowed_head_margin: float = 0.05

    def to_dict(self) -> dict:
        return {
            "windows": [[w.level, w.width] for w in self.windows],
            "image_size": self.image_size,
            "spacing_mm": self.spacing_mm,
            "interpolation_degree": self.interpolation_degree,
            "context_mm": self.context_mm,
            "windowed_source": [self.windowed_source.level, self.windowed_source.width],
            "head_extent_mm": self.head_extent_mm,
            "windowed_head_margin": self.windowed_head_margin,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        values = dict(data)
        values["windows"] = tuple(Window(*w) for w in values["windows"])
        values["windowed_source"] = Window(*values["windowed_source"])
        values.setdefault("windowed_head_margin", 0.0)  # saved before the setting: as trained
        return cls(**values)


def apply_windows(hu: torch.Tensor, windows: tuple[Window, ...]) -> torch.Tensor:
    """(..., H, W) HU -> (..., C, H, W) in [0, 1], one channel per window."""
    channels = [((hu - w.low) / w.width).clamp(0.0, 1.0) for w in windows]
    return torch.stack(channels, dim=-3)


@dataclass(frozen=True)
class InplaneTransform:
    """How original pixels map to model pixels: model = (original - offset) * scale."""

    scale: float  # model pixels per original pixel, along the rows (down the image)
    offset_row: float  # original pixel at model (0, 0)
    offset_col: float
    original_shape: tuple[int, int]
    scale_col: float | None = None  # along the columns where pixels are not square

    @property
    def col_scale(self) -> float:
        return self.scale if self.scale_col is None else self.scale_col

    def to_dict(self) -> dict:
        return {
            "scale": self.scale,
            "offset_row": self.offset_row,
            "offset_col": self.offset_col,
            "scale_col": self.col_scale,
            "original_shape": list(self.original_shape),
        }


def resample_inplane(
    hu: np.ndarray, pixel_spacing_mm: tuple[float, float] | None, config: PreprocessConfig
) -> tuple[torch.Tensor, InplaneTransform]:
    """(N, H, W) HU -> (N, S, S) HU at ``config.spacing_mm`` per pixel, centred on the head.

    Without a pixel spacing the input is a windowed picture: its floor value is the background,
    anything clearly above it (``windowed_head_margin`` of the window: JPEG noise leaves the
    black background at grey 0-2) is head, and the head's extent sets the scale.
    """
    volume = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))  # (N, H, W)
    if pixel_spacing_mm is None:
        background = float(hu.min())
        head = hu > background + config.windowed_head_margin * config.windowed_source.width
        scale = scale_col = config.head_extent_mm / config.spacing_mm / max(_extent(head), 1.0)
    else:  # (row, column) spacing: a non-square pixel is scaled along each axis by its own
        background = AIR_HU
        head = hu > -500
        scale = float(pixel_spacing_mm[0]) / config.spacing_mm
        scale_col = float(pixel_spacing_mm[1]) / config.spacing_mm
    size = config.image_size
    centre_row, centre_col = _centre(head)
    offset_row = centre_row - (size - 1) / 2 / scale
    offset_col = centre_col - (size - 1) / 2 / scale_col
    transform = InplaneTransform(
        scale, offset_row, offset_col, (hu.shape[-2], hu.shape[-1]), scale_col
    )
    return _sample(volume, transform, size, air=background), transform


def _flat(head: np.ndarray) -> np.ndarray:
    return np.asarray(head.any(axis=0) if head.ndim == 3 else head)


def _bounds(head: np.ndarray) -> tuple[float, float, float, float] | None:
    """Robust bounding box (1st to 99th percentile) of the head pixels: a thin table or head
    holder under the head holds few pixels and does not move it."""
    flat = _flat(head)
    if not flat.any():
        return None
    rows, cols = np.nonzero(flat)
    r0, r1 = np.percentile(rows, [1, 99])
    c0, c1 = np.percentile(cols, [1, 99])
    return float(r0), float(r1), float(c0), float(c1)


def _centre(head: np.ndarray) -> tuple[float, float]:
    """Centre of the head in pixels; the image centre if there is no head."""
    bounds = _bounds(head)
    if bounds is None:
        return (head.shape[-2] - 1) / 2, (head.shape[-1] - 1) / 2
    r0, r1, c0, c1 = bounds
    return (r0 + r1) / 2, (c0 + c1) / 2


def _extent(head: np.ndarray) -> float:
    bounds = _bounds(head)
    if bounds is None:
        return float(max(head.shape[-2:]))
    r0, r1, c0, c1 = bounds
    return max(r1 - r0, c1 - c0) + 1


def resample_mask(mask: np.ndarray, transform: InplaneTransform, size: int) -> np.ndarray:
    """(N, H, W) uint8 bit flags -> (N, S, S) on the model grid, one bit plane at a time.

    Only the slices where a bit is set are resampled for that bit (the rest stay 0, as they
    would): most slices and most bits of a study are empty, and this is most of the cost of
    preparing a masked study."""
    out = np.zeros((mask.shape[0], size, size), dtype=np.uint8)
    for bit in range(8):
        plane = (mask & np.uint8(1 << bit)) != 0  # (N, H, W)
        rows = np.flatnonzero(plane.reshape(len(plane), -1).any(axis=1))
        if rows.size == 0:
            continue
        sampled = _sample(torch.from_numpy(plane[rows]).float(), transform, size, air=0.0) > 0.5
        out[rows] |= sampled.numpy().astype(np.uint8) << np.uint8(bit)
    return out


def _sample(
    volume: torch.Tensor, transform: InplaneTransform, size: int, air: float = AIR_HU
) -> torch.Tensor:
    """Bilinear resampling with antialiasing when shrinking; air outside the original image."""
    n, height, width = volume.shape
    shifted = volume - air  # air becomes 0, so zero padding means air
    if min(transform.scale, transform.col_scale) < 1.0:
        # Shrink the whole image first with antialiasing, then crop by the same affine.
        new_h, new_w = (
            max(1, round(height * transform.scale)),
            max(1, round(width * transform.col_scale)),
        )
        shifted = F.interpolate(
            shifted[:, None],
            size=(new_h, new_w),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[:, 0]
        row_scale, col_scale = new_h / height, new_w / width
        offset_row = (transform.offset_row + 0.5) * row_scale - 0.5
        offset_col = (transform.offset_col + 0.5) * col_scale - 0.5
        step_row, step_col = transform.scale / row_scale, transform.col_scale / col_scale
        height, width = new_h, new_w
    else:
        offset_row, offset_col = transform.offset_row, transform.offset_col
        step_row, step_col = transform.scale, transform.col_scale
    rows = offset_row + torch.arange(size, dtype=torch.float32) / step_row  # (S,)
    cols = offset_col + torch.arange(size, dtype=torch.float32) / step_col
    grid_y = (2 * rows + 1) / height - 1
    grid_x = (2 * cols + 1) / width - 1
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)  # (S, S, 2)
    sampled = F.grid_sample(
        shifted[:, None],
        grid.expand(n, size, size, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )[:, 0]  # (N, S, S)
    return sampled + air


def to_original(heatmap: torch.Tensor, transform: InplaneTransform) -> torch.Tensor:
    """(N, S, S) map in model pixels -> (N, H, W) on the original slice grid (zero outside)."""
    n, size, _ = heatmap.shape
    height, width = transform.original_shape
    rows = (torch.arange(height, dtype=torch.float32) - transform.offset_row) * transform.scale
    cols = (torch.arange(width, dtype=torch.float32) - transform.offset_col) * transform.col_scale
    grid_y = (2 * rows + 1) / size - 1
    grid_x = (2 * cols + 1) / size - 1
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)
    return F.grid_sample(
        heatmap[:, None].float(),
        grid.expand(n, height, width, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )[:, 0]


def neighbour_slices(
    volume: torch.Tensor, positions_mm: np.ndarray, distance_mm: float, rows: slice = slice(None)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slices ``distance_mm`` below and above each slice (or each of ``rows``), linearly
    interpolated by position.

    volume: (N, ...) ordered by ascending position. Beyond the first or last slice the border
    slice is repeated (no invented anatomy). Uneven gaps are handled by the positions themselves.
    """
    positions = np.asarray(positions_mm, dtype=np.float64)
    if len(positions) == 1:
        return volume[rows], volume[rows]
    below = interpolate_at(volume, positions, positions[rows] - distance_mm)
    above = interpolate_at(volume, positions, positions[rows] + distance_mm)
    return below, above


def interpolate_at(
    volume: torch.Tensor,
    positions: np.ndarray,
    targets: np.ndarray,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Slices at ``targets`` mm, linear between the real slices around each, clamped at the ends.
    Only the slices needed are read (and converted to ``dtype``)."""
    dtype = dtype or volume.dtype
    clipped = np.clip(targets, positions[0], positions[-1])
    upper = np.clip(np.searchsorted(positions, clipped, side="left"), 1, len(positions) - 1)
    lower = upper - 1
    gap = positions[upper] - positions[lower]
    weight = np.where(gap > 0, (clipped - positions[lower]) / np.where(gap > 0, gap, 1), 0.0)
    shape = (-1,) + (1,) * (volume.dim() - 1)
    w = torch.as_tensor(weight, dtype=dtype).reshape(shape)
    return volume[lower].to(dtype) * (1 - w) + volume[upper].to(dtype) * w


def hu_from_windowed(image: np.ndarray, window: Window) -> np.ndarray:
    """Invert an 8-bit windowed picture to HU. Only the window's range survives: 0 means "at or
    below the window" and 255 "at or above"; training clips full-range CT the same way."""
    gray = image.mean(axis=-1) if image.ndim == 3 else image
    return (window.low + gray.astype(np.float32) / 255.0 * window.width).astype(np.float32)


def clip_to_window(hu: torch.Tensor, window: Window) -> torch.Tensor:
    """What a windowed picture keeps of full-range CT (the augmentation that matches it)."""
    return hu.clamp(window.low, window.high)


def model_input(
    hu_model_grid: torch.Tensor,
    positions_mm: np.ndarray,
    config: PreprocessConfig,
    chunk: int = 32,
) -> torch.Tensor:
    """(N, S, S) HU on the model grid -> (N, C, S, S) network input in [0, 1]: each slice's
    windows blended with those of its neighbours ``context_mm`` below and above,
    (1 - d) * slice + d * mean(below, above). The neighbours are interpolated by position in
    HU and windowed after, exactly as training builds a slice (``data.slice_input``):
    windowing clamps, so windowing first gives other values wherever a neighbour falls
    between real slices (any spacing but 5 mm).

    Done ``chunk`` slices at a time into one output tensor, so a long series needs its input
    and output plus a few slices of neighbours (a 500-slice series at 256 px: about 0.4 GB
    per output copy)."""
    hu = hu_model_grid
    windows, degree = config.windows, config.interpolation_degree
    out = torch.empty((len(hu), len(windows), *hu.shape[1:]), dtype=torch.float32)
    for start in range(0, len(hu), chunk):
        rows = slice(start, start + chunk)
        here = apply_windows(hu[rows].float(), windows)
        if degree == 0:
            out[rows] = here
            continue
        below, above = neighbour_slices(hu, positions_mm, config.context_mm, rows)
        context = apply_windows(below.float(), windows) + apply_windows(above.float(), windows)
        out[rows] = (1 - degree) * here + degree * 0.5 * context
    return out
