"""The one door between the web app and the model: ``Predictor.load(path).predict(series)``."""

import os
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.constants import CLASS_LABELS, CLASSES
from inference.dicom_io import CTSeries, load_series
from inference.gradcam import grad_cam
from inference.package import ModelPackage, aggregator_features, slice_outputs
from inference.preprocess import model_input, resample_inplane, to_original

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "ich-demo" / "model.pt"


def default_model_path() -> Path:
    return Path(os.environ.get("ICH_MODEL_PATH") or DEFAULT_MODEL)


@dataclass
class BasisEntry:
    """One atlas slice shown as the basis of a finding."""

    atlas_index: int
    similarity: float
    labels: dict[str, int]
    probability: float
    source: str
    thumbnail: np.ndarray  # (T, T) uint8, brain window
    attention: np.ndarray  # (T, T) uint8


@dataclass
class StudyPrediction:
    model_name: str
    model_version: str
    probabilities: dict[str, float]  # calibrated, study level
    thresholds: dict[str, float]  # operating points chosen on validation data
    flags: dict[str, bool]
    slice_probabilities: np.ndarray  # (N, 6), slices in position order
    key_slices: dict[str, int]  # slice index of the strongest evidence per class
    sop_instance_uids: list[str]
    heatmaps: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # flagged class -> (N, H, W) uint8
    prediction_basis: dict[str, list[BasisEntry]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready, class names spelled out; images left out."""
        return {
            "model": {"name": self.model_name, "version": self.model_version},
            "notice": "Triage support, not diagnosis: a clinician reads the full images.",
            "findings": [
                {
                    "class": name,
                    "label": CLASS_LABELS[name],
                    "probability": round(self.probabilities[name], 4),
                    "threshold": round(self.thresholds[name], 4),
                    "flagged": self.flags[name],
                    "key_slice": self.key_slices[name],
                    "key_sop_instance_uid": self.sop_instance_uids[self.key_slices[name]],
                    "prediction_basis": [
                        {
                            "atlas_index": b.atlas_index,
                            "similarity": round(b.similarity, 4),
                            "labels": [k for k, v in b.labels.items() if v],
                            "source": b.source,
                        }
                        for b in self.prediction_basis.get(name, [])
                    ],
                }
                for name in CLASSES
            ],
            "slices": len(self.sop_instance_uids),
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


CAM_MIN_SLICE_PROBABILITY = 0.1
CAM_OUTPUT_STRIDE = 8


class Predictor:
    def __init__(self, package: ModelPackage, device: torch.device) -> None:
        self.package = package
        self.device = device
        self.cam_output_stride = CAM_OUTPUT_STRIDE

    @classmethod
    def load(cls, path: Path | str | None = None, device: str | None = None) -> "Predictor":
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(ModelPackage.load(Path(path or default_model_path()), chosen), chosen)

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def version(self) -> str:
        return self.package.version

    def predict(
        self,
        series: CTSeries | Iterable[Path | str | bytes] | Path | str,
        *,
        heatmaps: bool = True,
        basis: bool = True,
        basis_k: int = 4,
        batch_size: int = 16,
    ) -> StudyPrediction:
        timings: dict[str, float] = {}
        clock = _Clock(timings)
        if not isinstance(series, CTSeries):
            series = load_series(series)
            clock.lap("read")
        config = self.package.preprocess
        grid, transform = resample_inplane(series.hu, series.pixel_spacing_mm, config)
        x = model_input(grid, series.positions_mm, config)  # (N, 3, S, S)
        del grid
        clock.lap("preprocess")
        logits, embeddings = self._run_members(x, batch_size)
        clock.lap("networks")
        study = self._study_logits(logits, embeddings)
        probabilities = self.package.calibrate(study)
        flags = probabilities >= self.package.thresholds
        slice_probabilities = torch.sigmoid(logits.mean(0)).numpy()  # (N, 6)
        key = slice_probabilities.argmax(axis=0)  # (6,)
        clock.lap("aggregate")
        prediction = StudyPrediction(
            model_name=self.package.name,
            model_version=self.package.version,
            probabilities={c: float(probabilities[i]) for i, c in enumerate(CLASSES)},
            thresholds={c: float(self.package.thresholds[i]) for i, c in enumerate(CLASSES)},
            flags={c: bool(flags[i]) for i, c in enumerate(CLASSES)},
            slice_probabilities=slice_probabilities,
            key_slices={c: int(key[i]) for i, c in enumerate(CLASSES)},
            sop_instance_uids=list(series.sop_instance_uids),
            timings=timings,
        )
        flagged = [i for i in range(len(CLASSES)) if flags[i]]
        if heatmaps and flagged:
            prediction.heatmaps = self._heatmaps(
                x, slice_probabilities, key, flagged, transform, batch_size
            )
            clock.lap("heatmaps")
        if basis and flagged and self.package.atlas is not None:
            prediction.prediction_basis = self._basis(embeddings, key, flagged, basis_k)
            clock.lap("basis")
        timings["total"] = sum(timings.values())
        return prediction

    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def _run_members(self, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embeddings = [], []
        with self._autocast():
            for chunk in torch.split(x, batch_size):
                out = slice_outputs(self.package.members, chunk.to(self.device))
                logits.append(out["logits"].float().cpu())
                embeddings.append(out["embeddings"].float().cpu())
        return torch.cat(logits, dim=1), torch.cat(embeddings, dim=1)

    @torch.no_grad()
    def _study_logits(self, logits: torch.Tensor, embeddings: torch.Tensor) -> np.ndarray:
        if self.package.aggregator is None:
            return logits.mean(0).amax(0).numpy()
        x = aggregator_features(logits, embeddings)[None].to(self.device)  # (1, N, F)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=self.device)
        return self.package.aggregator(x, mask)[0][0].float().cpu().numpy()

    def _heatmaps(
        self,
        x: torch.Tensor,
        slice_probabilities: np.ndarray,
        key: np.ndarray,
        flagged: list[int],
        transform: Any,
        batch_size: int,
    ) -> dict[str, np.ndarray]:
        """Grad-CAM of each flagged class on the slices that carry its evidence (slice
        probability >= CAM_MIN_SLICE_PROBABILITY, and the key slice), on the original grid; zero
        elsewhere. The last stage is computed densely (``cam_output_stride``) for finer maps."""
        size = self.package.preprocess.image_size
        wanted = {
            c: set(np.flatnonzero(slice_probabilities[:, c] >= CAM_MIN_SLICE_PROBABILITY))
            | {int(key[c])}
            for c in flagged
        }
        selected = sorted(set().union(*wanted.values()))
        height, width = transform.original_shape
        maps = {c: np.zeros((len(slice_probabilities), height, width), np.uint8) for c in flagged}
        for start in range(0, len(selected), batch_size):
            chunk = [int(i) for i in selected[start : start + batch_size]]
            batch = x[torch.tensor(chunk)].to(self.device)
            with torch.no_grad(), self._autocast():
                features = [
                    m.forward_features(batch, self.cam_output_stride) for m in self.package.members
                ]
            for c, cam in grad_cam(self.package.members, features, flagged, size).items():
                original = to_original(cam.float().cpu(), transform)  # (B, H, W)
                as_bytes = (original.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                for row, index in enumerate(chunk):
                    if index in wanted[c]:
                        maps[c][index] = as_bytes[row]
        return {CLASSES[c]: m for c, m in maps.items()}

    def _basis(
        self, embeddings: torch.Tensor, key: np.ndarray, flagged: list[int], k: int
    ) -> dict[str, list[BasisEntry]]:
        atlas = self.package.atlas
        if atlas is None:
            return {}
        out = {}
        for c in flagged:
            query = torch.nn.functional.normalize(
                torch.cat(list(embeddings[:, key[c]]), dim=-1), dim=-1
            ).numpy()
            out[CLASSES[c]] = [
                BasisEntry(
                    atlas_index=i,
                    similarity=similarity,
                    labels={name: int(atlas.labels[i, j]) for j, name in enumerate(CLASSES)},
                    probability=float(atlas.probabilities[i]),
                    source=atlas.sources[i],
                    thumbnail=atlas.thumbnails[i],
                    attention=atlas.attention[i],
                )
                for i, similarity in atlas.nearest(query, c, k)
            ]
        return out


class _Clock:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now
