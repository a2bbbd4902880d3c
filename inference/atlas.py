"""The prediction-basis atlas: per class, training slices the model got right with confidence.

For a new finding, the most similar atlas slices of the same class are shown beside it (Lee et al.
2019's "prediction basis"). Entries hold only small brain-window thumbnails, labels and attention
maps: no patient data, no DICOM headers.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from inference.constants import CLASSES
from inference.gradcam import class_activation
from inference.package import Atlas, ModelPackage
from inference.preprocess import BRAIN

if TYPE_CHECKING:
    from inference.data import Volume
    from inference.training import VolumeFeatures

THUMBNAIL = 96
CONFIDENT = 0.8
ATTRIBUTION = {
    "phantom": "synthetic phantom",
    "yolo": "roboflow-ich (CC BY 4.0; PhysioNet CT-ICH)",
    "cq500": "CQ500 (CC BY-NC-SA 4.0, qure.ai)",
    "study_folder": "study folder",
    "rsna": "RSNA 2019",
    "image_folder": "image folder",
}


def embedding_of(embeddings: torch.Tensor) -> np.ndarray:
    """(M, N, E) member embeddings -> (N, M*E) L2-normalised retrieval vectors."""
    joined = torch.cat(list(embeddings), dim=-1)
    return F.normalize(joined, dim=-1).numpy()


def build_atlas(
    package: ModelPackage,
    volumes: Sequence["Volume"],
    features: Sequence["VolumeFeatures"],
    *,
    per_class: int = 12,
) -> Atlas | None:
    from inference.data import slice_input

    entries: list[tuple[int, int, int, float]] = []  # (class, volume, slice, probability)
    vectors: list[np.ndarray] = []
    for c in range(len(CLASSES)):
        candidates = _correct_slices(volumes, features, c, CONFIDENT) or _correct_slices(
            volumes, features, c, 0.5
        )
        if not candidates:
            continue
        embedded = np.stack(
            [embedding_of(features[v].embeddings[:, s : s + 1])[0] for v, s, _ in candidates]
        )
        for pick in farthest_points(embedded, per_class):
            v, s, p = candidates[pick]
            entries.append((c, v, s, p))
            vectors.append(embedded[pick])
    if not entries:
        return None  # the model gets no training slice right: nothing to show as a basis
    thumbnails, attention = [], []
    for c, v, s, _ in entries:
        x, _ = slice_input(volumes[v], s, package.preprocess, None)
        with torch.no_grad():
            maps = [m.forward_maps(m.forward_features(x[None])) for m in package.members]
        cam = class_activation(package.members, maps, c, package.preprocess.image_size)
        thumbnails.append(_thumbnail(volumes[v].hu[s].float()))
        attention.append(_to_uint8(_resize(cam[0])))
    return Atlas(
        embeddings=np.stack(vectors).astype(np.float32),
        classes=np.array([c for c, *_ in entries]),
        labels=np.stack(
            [np.nan_to_num(volumes[v].slice_labels[s]).astype(np.uint8) for _, v, s, _ in entries]
        ),
        probabilities=np.array([p for *_, p in entries], dtype=np.float32),
        thumbnails=np.stack(thumbnails),
        attention=np.stack(attention),
        sources=[ATTRIBUTION.get(volumes[v].source, volumes[v].source) for _, v, _, _ in entries],
    )


def _correct_slices(
    volumes: Sequence["Volume"], features: Sequence["VolumeFeatures"], c: int, confidence: float
) -> list[tuple[int, int, float]]:
    """(volume, slice, probability) of positive slices the ensemble scores at ``confidence``+."""
    found = []
    for v, (volume, f) in enumerate(zip(volumes, features, strict=True)):
        probability = torch.sigmoid(f.logits.mean(0)[:, c]).numpy()  # (N,)
        right = (volume.slice_labels[:, c] == 1) & (probability >= confidence)
        found += [(v, int(s), float(probability[s])) for s in np.flatnonzero(right)]
    return found


def farthest_points(vectors: np.ndarray, k: int) -> list[int]:
    """A diverse subset of up to k distinct points (unit vectors): the first point, then each
    time the one farthest from those chosen. Copies of a chosen point are never chosen, so
    fewer than k come back where fewer than k differ."""
    if k < 1:
        raise ValueError(f"an atlas keeps at least 1 slice per class, not {k}")
    if len(vectors) == 0:
        return []
    chosen = [0]
    distance = 1 - vectors @ vectors[0]
    distance[0] = -np.inf
    while len(chosen) < min(k, len(vectors)):
        nxt = int(np.argmax(distance))
        if distance[nxt] <= 1e-6:  # every point left is a copy of one chosen
            break
        chosen.append(nxt)
        distance = np.minimum(distance, 1 - vectors @ vectors[nxt])
        distance[chosen] = -np.inf
    return chosen


def _resize(image: torch.Tensor) -> torch.Tensor:
    return F.interpolate(
        image[None, None],
        size=(THUMBNAIL, THUMBNAIL),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0, 0]


def _thumbnail(hu: torch.Tensor) -> np.ndarray:
    return _to_uint8(((_resize(hu) - BRAIN.low) / BRAIN.width).clamp(0, 1))


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
