"""Training data in memory: every study on the model grid, slices sampled with augmentation."""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from inference import datasets, dicom_io
from inference.constants import CLASSES, SUBTYPES
from inference.preprocess import (
    BRAIN,
    PreprocessConfig,
    Window,
    apply_windows,
    clip_to_window,
    hu_from_windowed,
    interpolate_at,
    resample_inplane,
    resample_mask,
)


@dataclass
class Volume:
    """One study (or one windowed picture, N = 1) ready for the network."""

    key: str
    patient_id: str
    hu: torch.Tensor  # (N, S, S) float16 HU on the model grid
    positions_mm: np.ndarray  # (N,)
    slice_labels: np.ndarray  # (N, 6) float32, NaN where unknown
    study_labels: np.ndarray  # (6,) float32, NaN where unknown
    masks: np.ndarray | None  # (N, S, S) uint8 bit flags (SUBTYPES order) or None
    windowed_source: bool  # came from an 8-bit windowed picture
    source: str  # dataset kind, for reports and the atlas' attribution


@dataclass
class DataSource:
    kind: str  # phantom | study_folder | cq500 | rsna | yolo | image_folder
    path: str
    labels_csv: str | None = None
    max_items: int | None = None


def read_source(source: DataSource) -> list:
    readers: dict[str, Any] = {
        "phantom": datasets.read_phantom_dataset,
        "study_folder": datasets.read_study_folder,
        "cq500": datasets.read_cq500,
        "rsna": datasets.read_rsna,
        "yolo": datasets.read_yolo_slices,
    }
    items: list[Any]
    if source.kind == "image_folder":
        if not source.labels_csv:
            raise ValueError(
                f"{source.path}: an image_folder set needs its labels CSV"
                " (`--labels` on the command line, labels_csv in a config)"
            )
        items = datasets.read_image_folder(Path(source.path), Path(source.labels_csv))
    elif source.kind in readers:
        items = readers[source.kind](Path(source.path))
    else:
        kinds = ", ".join(sorted([*readers, "image_folder"]))
        raise ValueError(f"unknown data source kind {source.kind!r} (use one of {kinds})")
    return items[: source.max_items] if source.max_items else items


def prepare_study(item: "datasets.StudyItem", config: PreprocessConfig, source: str) -> Volume:
    series = dicom_io.load_series(item.paths, skip_bad=True)
    hu, transform = resample_inplane(series.hu, series.pixel_spacing_mm, config)
    slice_labels = np.full((len(series.sop_instance_uids), len(CLASSES)), np.nan, np.float32)
    if item.slice_labels:
        for index, uid in enumerate(series.sop_instance_uids):
            if uid in item.slice_labels:
                slice_labels[index] = item.slice_labels[uid]
    masks = None
    if item.masks_path is not None and Path(item.masks_path).exists():
        masks = _masks_in_series_order(Path(item.masks_path), series.sop_instance_uids)
        masks = resample_mask(masks, transform, config.image_size) if masks is not None else None
    return Volume(
        key=item.study_id,
        patient_id=item.patient_id,
        hu=hu.to(torch.float16),
        positions_mm=np.asarray(series.positions_mm, dtype=np.float64),
        slice_labels=slice_labels,
        study_labels=np.asarray(item.labels, dtype=np.float32),
        masks=masks,
        windowed_source=False,
        source=source,
    )


def _masks_in_series_order(path: Path, sop_uids: Sequence[str]) -> np.ndarray | None:
    with np.load(path, allow_pickle=False) as stored:
        order = {str(uid): i for i, uid in enumerate(stored["sop_instance_uids"])}
        if not all(uid in order for uid in sop_uids):
            return None
        return stored["masks"][[order[uid] for uid in sop_uids]]


def prepare_slice(item: "datasets.SliceItem", config: PreprocessConfig, source: str) -> Volume:
    picture = np.asarray(Image.open(item.image_path).convert("L"))
    hu = hu_from_windowed(picture, config.windowed_source)[None]  # (1, H, W)
    grid_hu, transform = resample_inplane(hu, None, config)
    boxes_mask = _boxes_to_mask(item.boxes, picture.shape)
    masks = resample_mask(boxes_mask[None], transform, config.image_size)
    labels = np.asarray(item.labels, dtype=np.float32)
    return Volume(
        key=datasets.item_key(item),
        patient_id=item.patient_id,
        hu=grid_hu.to(torch.float16),
        positions_mm=np.zeros(1),
        slice_labels=labels[None],
        study_labels=labels,
        masks=masks,
        windowed_source=True,
        source=source,
    )


def _boxes_to_mask(boxes: Iterable, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    height, width = shape
    for subtype, x0, y0, x1, y1 in boxes:
        rows = slice(int(y0 * height), max(math.ceil(y1 * height), int(y0 * height) + 1))
        cols = slice(int(x0 * width), max(math.ceil(x1 * width), int(x0 * width) + 1))
        mask[rows, cols] |= np.uint8(1 << subtype)
    return mask


def prepare(
    items: Sequence[Any], config: PreprocessConfig, source: str, progress: Any = None
) -> list[Volume]:
    volumes = []
    for item in items:
        if isinstance(item, datasets.SliceItem):
            volumes.append(prepare_slice(item, config, source))
        else:
            volumes.append(prepare_study(item, config, source))
        if progress is not None:
            progress.update(1)
    return volumes


@dataclass
class Augment:
    enabled: bool = True
    clip_window_prob: float = 0.3  # full-range CT clipped like a windowed picture
    flip_prob: float = 0.5
    max_rotation_deg: float = 10.0
    max_scale: float = 0.1
    max_shift: float = 0.06
    noise_hu: float = 4.0


def slice_input(
    volume: Volume,
    index: int,
    config: PreprocessConfig,
    augment: Augment | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, np.ndarray | None]:
    """One network input (3, S, S) for slice ``index`` with its neighbours, augmented."""
    positions = volume.positions_mm
    here = volume.hu[index].float()  # (S, S)
    if len(positions) > 1:
        below = _slice_at(volume.hu, positions, positions[index] - config.context_mm)
        above = _slice_at(volume.hu, positions, positions[index] + config.context_mm)
        stack = torch.stack([below, here, above])  # (3 slices, S, S)
    else:
        stack = here.expand(3, -1, -1)
    mask = volume.masks[index] if volume.masks is not None else None
    if augment is not None and augment.enabled:
        stack, mask = _augment(
            stack, mask, volume.windowed_source, augment, generator, config.windowed_source
        )
    windowed = apply_windows(stack, config.windows)  # (3 slices, C, S, S)
    degree = config.interpolation_degree
    blended = (1 - degree) * windowed[1] + degree * 0.5 * (windowed[0] + windowed[2])
    return blended, mask


def _slice_at(hu: torch.Tensor, positions: np.ndarray, target: float) -> torch.Tensor:
    """The slice at ``target`` mm, interpolated from the two real slices around it."""
    return interpolate_at(hu, positions, np.array([target]), dtype=torch.float32)[0]


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=generator))


def _augment(
    stack: torch.Tensor,
    mask: np.ndarray | None,
    windowed_source: bool,
    augment: Augment,
    generator: torch.Generator | None,
    picture_window: Window = BRAIN,
) -> tuple[torch.Tensor, np.ndarray | None]:
    """``picture_window``: the window the model's windowed pictures were saved in
    (``PreprocessConfig.windowed_source``), which the clipping augmentation imitates."""
    if not windowed_source and _rand(generator) < augment.clip_window_prob:
        stack = clip_to_window(stack, picture_window)
    angle = math.radians((2 * _rand(generator) - 1) * augment.max_rotation_deg)
    scale = 1 + (2 * _rand(generator) - 1) * augment.max_scale
    shift = [(2 * _rand(generator) - 1) * augment.max_shift * 2 for _ in range(2)]
    flip = -1.0 if _rand(generator) < augment.flip_prob else 1.0
    theta = torch.tensor(
        [
            [flip * math.cos(angle) / scale, -math.sin(angle) / scale, shift[0]],
            [flip * math.sin(angle) / scale, math.cos(angle) / scale, shift[1]],
        ],
        dtype=torch.float32,
    )[None]
    size = stack.shape[-1]
    grid = F.affine_grid(theta, [1, 1, size, size], align_corners=False)
    floor = float(stack.min())
    moved = (
        F.grid_sample(
            (stack - floor)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )[0]
        + floor
    )
    moved = moved + torch.randn(moved.shape, generator=generator) * augment.noise_hu * _rand(
        generator
    )
    if mask is not None:
        planes = torch.from_numpy(np.unpackbits(mask[None], axis=0, bitorder="little")).float()
        planes = F.grid_sample(
            planes[None], grid.expand(1, -1, -1, -1), mode="nearest", align_corners=False
        )[0]
        mask = np.packbits(planes.numpy().astype(bool), axis=0, bitorder="little")[0]
    return moved, mask


class SliceSampler:
    """Each epoch: a fixed number of labelled slices, half positive, rare subtypes upweighted."""

    def __init__(self, volumes: Sequence[Volume], positive_fraction: float = 0.5) -> None:
        index = [
            (v, s)
            for v, volume in enumerate(volumes)
            for s in range(len(volume.positions_mm))
            if not np.isnan(volume.slice_labels[s, 0])
        ]
        if not index:
            raise ValueError("no slice has labels: slice training needs slice-level labels")
        self.index = np.asarray(index)
        labels = np.stack([volumes[v].slice_labels[s] for v, s in index])  # (M, 6)
        positive = labels[:, 0] == 1
        frequency = np.nansum(labels[:, 1:], axis=0) + 1  # (5,)
        rarity = np.where(np.nan_to_num(labels[:, 1:]) == 1, 1 / frequency, 0).max(axis=1)
        weights = np.where(positive, np.sqrt(np.maximum(rarity, 1 / frequency.max())), 0.0)
        self.positive_p = weights / weights.sum() if weights.sum() else None
        negative = ~positive
        self.negative_p = negative / negative.sum() if negative.sum() else None
        self.positive_fraction = positive_fraction
        self.labels = labels

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        n_pos = round(count * self.positive_fraction) if self.positive_p is not None else 0
        n_pos = count if self.negative_p is None else n_pos
        picks = []
        if n_pos:
            picks.append(rng.choice(len(self.index), n_pos, p=self.positive_p))
        if count - n_pos:
            picks.append(rng.choice(len(self.index), count - n_pos, p=self.negative_p))
        chosen = np.concatenate(picks)
        rng.shuffle(chosen)
        return self.index[chosen]


def class_counts(volumes: Sequence[Volume]) -> dict[str, int]:
    counts = {name: 0 for name in CLASSES}
    for volume in volumes:
        for i, name in enumerate(CLASSES):
            counts[name] += int(np.nansum(volume.study_labels[i] == 1))
    return counts


SUBTYPE_BITS = {name: 1 << i for i, name in enumerate(SUBTYPES)}
