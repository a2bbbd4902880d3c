"""The one door between the web app and the model: ``Predictor.load(path).predict(series)``."""

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.constants import CLASS_LABELS, CLASSES
from inference.convexity import readers_study_logits
from inference.dicom_io import CTSeries, load_series
from inference.feature_cache import FeatureCache, autocast, member_outputs, networks_fingerprint
from inference.gradcam import class_activation
from inference.models import EfficientNetLite, folded_for_inference
from inference.package import (
    ModelPackage,
    aggregator_features,
    check_same_networks,
    shared_slice_outputs,
)
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
    # the operating points the flags used, chosen on validation data: the package's, or for a
    # class a strip reader fuses but could not read on this series, the ensemble's own
    thresholds: dict[str, float]
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
            "flagging": 'probability >= threshold; a subtype only when "any" is flagged too',
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
            # per class, one probability per slice in position order (the ensemble's, before
            # calibration: what the key slices and heatmaps follow)
            "slice_probabilities": {
                name: [round(float(p), 4) for p in self.slice_probabilities[:, i]]
                for i, name in enumerate(CLASSES)
            },
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


CAM_MIN_SLICE_PROBABILITY = 0.1
HEAD_HU = -500  # above this: scalp, skull, brain (air is -1000)


class Predictor:
    def __init__(self, package: ModelPackage, device: torch.device) -> None:
        self.package = package
        self.device = device
        self._networks: list[EfficientNetLite] | None = None
        self._fingerprint: str | None = None  # of the networks, for a FeatureCache

    def networks(self) -> list[EfficientNetLite]:
        """The package's members with their batch norms folded (``folded_for_inference``),
        made at the first prediction: what the predictor runs. A package's members changed
        after that need a new Predictor."""
        if self._networks is None:
            self._networks = [folded_for_inference(m) for m in self.package.members]
        return self._networks

    @classmethod
    def load(cls, path: Path | str | None = None, device: str | None = None) -> "Predictor":
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if chosen.type not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r}: cpu or cuda")
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: this machine has no CUDA device torch can use")
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
        batch_size: int | None = None,
    ) -> StudyPrediction:
        """batch_size: slices per network pass; by default 8 on CPU (a 500-slice series at
        256 px peaks near 2.3 GB with 8 or 16; 8 was faster in docs/benchmarks.md) and 32 on
        CUDA."""
        return self.predict_shared(
            series, [], heatmaps=heatmaps, basis=basis, basis_k=basis_k, batch_size=batch_size
        )[0]

    def predict_shared(
        self,
        series: CTSeries | Iterable[Path | str | bytes] | Path | str,
        others: "Sequence[Predictor]",
        *,
        heatmaps: bool = True,
        basis: bool = True,
        basis_k: int = 4,
        batch_size: int | None = None,
    ) -> list[StudyPrediction]:
        """This predictor's prediction and then each of ``others``', from one pass of the
        networks: ``others`` must have the same networks and preprocessing and may differ in
        their heads, study level, calibration, operating points and atlas (a package from
        ``ich refit-heads`` against the one it came from). Each prediction is what its own
        ``predict`` gives; the shared stages' timings are in every one."""
        batch_size = batch_size or (32 if self.device.type == "cuda" else 8)
        for other in others:
            check_same_networks(self.package, other.package)
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
        predictors = [self, *others]
        outputs = self._run_members(x, batch_size, [p.package.members for p in others])
        del x  # the heatmaps that follow need the class maps only: peak memory on long series
        clock.lap("networks")
        return [
            p._finish(series, transform, out, dict(timings), heatmaps, basis, basis_k, batch_size)
            for p, out in zip(predictors, outputs, strict=True)
        ]

    def _finish(
        self,
        series: CTSeries,
        transform: Any,
        outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        timings: dict[str, float],
        heatmaps: bool,
        basis: bool,
        basis_k: int,
        batch_size: int,
    ) -> StudyPrediction:
        logits, embeddings, class_maps = outputs
        clock = _Clock(timings)
        study = self._calibrated_logits(logits, embeddings)
        clock.lap("aggregate")
        thresholds = None  # the package's operating points
        readers = self.package.readers()
        read = readers_study_logits(readers, series.hu, series.pixel_spacing_mm)
        ensemble = study.copy()  # the ensemble's own, which a cross-class fusion reads
        for reader, strips in zip(readers, read, strict=True):
            study = reader.fuse(study, strips, ensemble)
            if strips is None:  # the scores before this reader: their own operating points
                thresholds = reader.unread_thresholds(
                    self.package.thresholds if thresholds is None else thresholds
                )
            clock.lap("strips")
        probabilities = 1.0 / (1.0 + np.exp(-study))
        # the operating points these flags use, and the ones the prediction reports
        applied = self.package.thresholds if thresholds is None else thresholds
        flags = self.package.flags(probabilities, applied)
        slice_probabilities = torch.sigmoid(logits.mean(0)).numpy()  # (N, 6)
        key = slice_probabilities.argmax(axis=0)  # (6,)
        prediction = StudyPrediction(
            model_name=self.package.name,
            model_version=self.package.version,
            probabilities={c: float(probabilities[i]) for i, c in enumerate(CLASSES)},
            thresholds={c: float(applied[i]) for i, c in enumerate(CLASSES)},
            flags={c: bool(flags[i]) for i, c in enumerate(CLASSES)},
            slice_probabilities=slice_probabilities,
            key_slices={c: int(key[i]) for i, c in enumerate(CLASSES)},
            sop_instance_uids=list(series.sop_instance_uids),
            timings=timings,
        )
        flagged = [i for i in range(len(CLASSES)) if flags[i]]
        if heatmaps and flagged:
            prediction.heatmaps = self._heatmaps(
                class_maps, slice_probabilities, key, flagged, transform, batch_size, series.hu
            )
            clock.lap("heatmaps")
        if basis and flagged and self.package.atlas is not None:
            prediction.prediction_basis = self._basis(embeddings, key, flagged, basis_k)
            clock.lap("basis")
        timings["total"] = sum(timings.values())
        return prediction

    @torch.no_grad()
    def _run_members(
        self, x: torch.Tensor, batch_size: int, others: list[list[EfficientNetLite]]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For this predictor's members and then per entry of ``others`` (member lists with
        these networks and other heads): slice logits (M, N, 6), embeddings (M, N, E) and class
        evidence maps (M, N, 6, h, w). One pass of the networks gives the scores and everything
        Grad-CAM needs, for every set of heads."""
        heads = [self.networks(), *others]
        parts: list[list[dict[str, torch.Tensor]]] = [[] for _ in heads]
        with autocast(self.device):
            for chunk in torch.split(x, batch_size):
                outs = shared_slice_outputs(heads, chunk.to(self.device))
                for part, out in zip(parts, outs, strict=True):
                    part.append({k: v.float().cpu() for k, v in out.items()})
        return [
            (
                torch.cat([o["logits"] for o in part], dim=1),
                torch.cat([o["embeddings"] for o in part], dim=1),
                torch.cat([o["class_maps"] for o in part], dim=1),
            )
            for part in parts
        ]

    def ensemble_logits(
        self,
        series: CTSeries,
        batch_size: int | None = None,
        cache: FeatureCache | None = None,
    ) -> np.ndarray:
        """The ensemble's calibrated study logits (6,), before any strip evidence joins them:
        what ``ich convexity`` fits its fusion on. With ``cache``, the networks' embeddings of
        a study it has seen come from there (``feature_cache``)."""
        batch_size = batch_size or (32 if self.device.type == "cuda" else 8)
        grid, _ = resample_inplane(series.hu, series.pixel_spacing_mm, self.package.preprocess)
        x = model_input(grid, series.positions_mm, self.package.preprocess)  # (N, 3, S, S)
        if cache is not None and self._fingerprint is None:
            self._fingerprint = networks_fingerprint(self.package.members, self.device)
        logits, embeddings = member_outputs(
            self.networks(),
            x,
            self.device,
            batch_size=batch_size,
            cache=cache,
            fingerprint=self._fingerprint,
        )
        return self._calibrated_logits(logits, embeddings)

    def _calibrated_logits(self, logits: torch.Tensor, embeddings: torch.Tensor) -> np.ndarray:
        """Platt scaling in logit space: a * study logit + b per class (6,)."""
        study = self._study_logits(logits, embeddings).astype(np.float64)
        return self.package.calibration[:, 0] * study + self.package.calibration[:, 1]

    @torch.no_grad()
    def _study_logits(self, logits: torch.Tensor, embeddings: torch.Tensor) -> np.ndarray:
        if self.package.aggregator is None:
            return logits.mean(0).amax(0).numpy()
        x = aggregator_features(logits, embeddings)[None].to(self.device)  # (1, N, F)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=self.device)
        return self.package.aggregator(x, mask)[0][0].float().cpu().numpy()

    def _heatmaps(
        self,
        class_maps: torch.Tensor,
        slice_probabilities: np.ndarray,
        key: np.ndarray,
        flagged: list[int],
        transform: Any,
        batch_size: int,
        hu: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Grad-CAM of each flagged class on the slices that carry its evidence (slice
        probability >= CAM_MIN_SLICE_PROBABILITY, and the key slice), on the original grid; zero
        elsewhere. Computed in closed form from the class evidence maps of the networks pass
        (``gradcam.class_activation``), at the stride the model was trained with, and shown over
        the patient only (HU > HEAD_HU): the coarse map's spill into the air means nothing."""
        size = self.package.preprocess.image_size
        height, width = transform.original_shape
        out = {}
        for c in flagged:
            wanted = set(np.flatnonzero(slice_probabilities[:, c] >= CAM_MIN_SLICE_PROBABILITY))
            chosen = sorted(wanted | {int(key[c])})
            heatmap = np.zeros((len(slice_probabilities), height, width), np.uint8)
            for start in range(0, len(chosen), batch_size):
                rows = torch.tensor(chosen[start : start + batch_size])
                cam = class_activation(
                    self.package.members, list(class_maps[:, rows]), c, size
                )  # (B, S, S)
                original = to_original(cam, transform)  # (B, H, W)
                original = original * torch.from_numpy(hu[rows.numpy()] > HEAD_HU)
                peak = original.flatten(1).amax(1).clamp_min(1e-6)[:, None, None]
                original = original / peak  # the strongest evidence in the head reads 255
                heatmap[rows.numpy()] = (original.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            out[CLASSES[c]] = heatmap
        return out

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
