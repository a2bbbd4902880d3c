"""A trained model as one file: networks, preprocessing, aggregator, calibration, operating points
and the prediction-basis atlas. Loaded with ``torch.load(weights_only=True)``: data, never code."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.constants import CLASSES
from inference.convexity import ConvexityReader
from inference.models import AggregatorConfig, EfficientNetLite, StudyAggregator
from inference.preprocess import PreprocessConfig

FORMAT_VERSION = 1


def platt(logits: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Platt scaling per class: p = sigmoid(a * logit + b), params (6, 2) rows of (a, b)."""
    return 1.0 / (1.0 + np.exp(-(params[:, 0] * logits + params[:, 1])))


@dataclass
class Atlas:
    """Training slices the model got right with high confidence, per class, de-identified."""

    embeddings: np.ndarray  # (K, D) float32, L2-normalised
    classes: np.ndarray  # (K,) index into CLASSES of the class the entry illustrates
    labels: np.ndarray  # (K, 6) uint8, every class of that slice
    probabilities: np.ndarray  # (K,) the model's probability for that class
    thumbnails: np.ndarray  # (K, T, T) uint8, brain window
    attention: np.ndarray  # (K, T, T) uint8, Grad-CAM of that class
    sources: list[str]  # dataset and licence, e.g. "phantom" or "roboflow-ich (CC BY 4.0)"

    def nearest(self, embedding: np.ndarray, class_index: int, k: int) -> list[tuple[int, float]]:
        """The k entries of ``class_index`` most similar (cosine) to ``embedding``."""
        if k < 1:
            raise ValueError(f"k is at least 1, not {k}")
        candidates = np.flatnonzero(self.classes == class_index)
        if len(candidates) == 0:
            return []
        query = embedding / max(float(np.linalg.norm(embedding)), 1e-8)
        similarity = self.embeddings[candidates] @ query  # (C,)
        best = np.argsort(-similarity)[:k]
        return [(int(candidates[i]), float(similarity[i])) for i in best]

    def to_state(self) -> dict[str, Any]:
        return {
            "embeddings": torch.from_numpy(self.embeddings.astype(np.float16)),
            "classes": torch.from_numpy(self.classes.astype(np.int64)),
            "labels": torch.from_numpy(self.labels.astype(np.uint8)),
            "probabilities": torch.from_numpy(self.probabilities.astype(np.float32)),
            "thumbnails": torch.from_numpy(self.thumbnails),
            "attention": torch.from_numpy(self.attention),
            "sources": list(self.sources),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Atlas":
        return cls(
            embeddings=state["embeddings"].float().numpy(),
            classes=state["classes"].numpy(),
            labels=state["labels"].numpy(),
            probabilities=state["probabilities"].numpy(),
            thumbnails=state["thumbnails"].numpy(),
            attention=state["attention"].numpy(),
            sources=list(state["sources"]),
        )


# A package's strip readers, in the order they join. Each fuses classes no other reader fuses
# (inference/convexity_fit.py: check_slot), so the order moves no score.
READER_SLOTS = ("convexity", "sulcal", "crescent", "lens")


@dataclass
class ModelPackage:
    name: str
    version: str
    preprocess: PreprocessConfig
    members: list[EfficientNetLite]
    aggregator: StudyAggregator | None  # None: the study logit is the max over slices
    calibration: np.ndarray = field(default_factory=lambda: np.tile([1.0, 0.0], (len(CLASSES), 1)))
    thresholds: np.ndarray = field(default_factory=lambda: np.full(len(CLASSES), 0.5))
    atlas: Atlas | None = None
    training: dict[str, Any] = field(default_factory=dict)
    convexity: ConvexityReader | None = None  # strip network joined by `ich convexity`
    # a second strip network (`ich convexity --reader sulcal`), fused after the first and only
    # for the classes it was added for, so the first reader's classes cannot move
    sulcal: ConvexityReader | None = None
    # a third (`ich convexity --reader crescent`): another network of extra-axial blood, fused
    # for classes the first reader leaves to it
    crescent: ConvexityReader | None = None
    # a fourth (`ich convexity --reader lens`): a network trained for epidural lenses alone
    lens: ConvexityReader | None = None

    def readers(self) -> list[ConvexityReader]:
        """The strip readers in the order their evidence joins the study scores."""
        return [r for r in (getattr(self, slot) for slot in READER_SLOTS) if r is not None]

    @property
    def feature_dim(self) -> int:
        return sum(m.embedding_dim + len(CLASSES) for m in self.members)

    def flags(self, probabilities: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
        """Flags at the operating points (``thresholds``, else the package's), (..., 6) bool. A
        subtype is flagged only together with "any": its own threshold is chosen for
        sensitivity, and alone it would put studies the model does not think bleed at the top
        of the worklist."""
        flags = np.asarray(probabilities) >= (self.thresholds if thresholds is None else thresholds)
        flags[..., 1:] &= flags[..., :1]
        return flags

    def ensemble_thresholds(self) -> np.ndarray:
        """The operating points (6,) of the ensemble alone, before any strip reader joins: each
        class a reader fuses goes back to the threshold it had before that reader (what a series
        no reader can read, a windowed picture, is flagged at)."""
        thresholds = np.asarray(self.thresholds, dtype=np.float64)
        for reader in self.readers():
            thresholds = reader.unread_thresholds(thresholds)
        return thresholds

    def slice_thresholds(self) -> np.ndarray | None:
        """The saved operating points carried to single slices (6,), on the scale of the
        predictor's slice probabilities (the sigmoid of the members' mean logit, uncalibrated).
        A slice reaches its class's threshold exactly when that slice alone would make the
        ensemble flag the study: the study logit is the maximum over slices, calibrated by
        ``a * logit + b``, so the threshold t maps to the slice logit (logit(t) - b) / a.

        None where no such slice threshold exists: a sequence model pools the slices, or a
        calibration slope is not positive."""
        a, b = self.calibration[:, 0], self.calibration[:, 1]
        if self.aggregator is not None or not (a > 0).all():
            return None
        t = np.clip(self.ensemble_thresholds(), 1e-12, 1 - 1e-12)
        slice_logit = (np.log(t / (1 - t)) - b) / a
        return 1.0 / (1.0 + np.exp(-slice_logit))

    def save(self, path: Path) -> None:
        state = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "classes": list(CLASSES),
            "preprocess": self.preprocess.to_dict(),
            "members": [
                {
                    "variant": m.variant,
                    "output_stride": m.output_stride,
                    "state": {
                        k: v.half() if _stored_in_half(k, v) else v
                        for k, v in m.state_dict().items()
                    },
                }
                for m in self.members
            ],
            "aggregator": None
            if self.aggregator is None
            else {
                "config": vars(self.aggregator.config),
                "state": self.aggregator.state_dict(),
            },
            "calibration": torch.from_numpy(np.asarray(self.calibration, dtype=np.float64)),
            "thresholds": torch.from_numpy(np.asarray(self.thresholds, dtype=np.float64)),
            "atlas": None if self.atlas is None else self.atlas.to_state(),
            "training": _pseudonymised(self.training),
            **{
                slot: None if getattr(self, slot) is None else getattr(self, slot).to_state()
                for slot in READER_SLOTS
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> "ModelPackage":
        if Path(path).is_dir():
            raise ValueError(f"{path}: a folder, not a model package (a model.pt file)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as error:  # not a torch file, truncated, or not weights only
            raise ValueError(
                f"{path}: not a readable model package ({_load_problem(error)})"
            ) from None
        if not isinstance(state, dict) or list(state.get("classes", [])) != list(CLASSES):
            raise ValueError(f"{path}: not an ICH model package")
        version = state.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path}: a model package of format {version}; this version of ich reads"
                f" format {FORMAT_VERSION}"
                + (" (the package is newer: update ich)" if _newer(version) else "")
            )
        try:
            return cls._from_state(state, device)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
            problem = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
            if isinstance(error, KeyError):
                problem = f"no {problem}"
            raise ValueError(f"{path}: a damaged model package ({problem})") from None

    @classmethod
    def _from_state(cls, state: dict[str, Any], device: torch.device | str) -> "ModelPackage":
        members = []
        for member in state["members"]:
            model = EfficientNetLite(
                member["variant"], output_stride=int(member.get("output_stride", 32))
            )
            model.load_state_dict(
                {k: v.float() if v.is_floating_point() else v for k, v in member["state"].items()}
            )
            members.append(model.to(device).eval())
        aggregator = None
        if state["aggregator"] is not None:
            aggregator = StudyAggregator(AggregatorConfig(**state["aggregator"]["config"]))
            aggregator.load_state_dict(state["aggregator"]["state"])
            aggregator = aggregator.to(device).eval()
        return cls(
            name=state["name"],
            version=state["version"],
            preprocess=PreprocessConfig.from_dict(state["preprocess"]),
            members=members,
            aggregator=aggregator,
            calibration=state["calibration"].numpy(),
            thresholds=state["thresholds"].numpy(),
            atlas=None if state["atlas"] is None else Atlas.from_state(state["atlas"]),
            training=state["training"],
            **{
                slot: None
                if state.get(slot) is None
                else ConvexityReader.from_state(state[slot], device)
                for slot in READER_SLOTS
            },
        )


def _pseudonymised(training: dict[str, Any] | None) -> dict[str, Any] | None:
    """The training record with every item of its split recorded as a pseudonym: a package
    saved again (``ich atlas build``, ``ich convexity``) from one that recorded plain keys
    (before 2026-12-07) no longer holds them."""
    from inference.datasets import pseudonym

    if not isinstance(training, dict) or not isinstance(training.get("split"), dict):
        return training
    split = {
        part: [pseudonym(str(k)) for k in keys] if isinstance(keys, list) else keys
        for part, keys in training["split"].items()
    }
    return {**training, "split": split}


def _newer(version: object) -> bool:
    return isinstance(version, int) and version > FORMAT_VERSION


def _load_problem(error: Exception) -> str:
    """A short reason torch.load failed, without its advice to load unsafely."""
    text = str(error)
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, EOFError) or "Ran out of input" in text:
        return "empty or truncated file"
    if isinstance(error, OSError) or "zip archive" in text or "PytorchStreamReader" in text:
        return "truncated, or not a PyTorch file"
    # garbage, or a pickle that names code to run: torch reads weights only and runs nothing
    return "not a PyTorch file of weights (only weights are read; nothing in it was run)"


def _stored_in_half(name: str, value: torch.Tensor) -> bool:
    """float16 halves a package's file; the linear head stays float32, since a head refitted on
    fresh studies (inference/heads.py) folds a large standardising offset into its bias."""
    return value.is_floating_point() and not name.startswith("fc.")


@torch.no_grad()
def round_as_saved(model: EfficientNetLite) -> EfficientNetLite:
    """Rounds ``model``'s weights in place as ``ModelPackage.save`` stores them, so that what is
    fitted on its outputs (study level, calibration, operating points) is fitted on the networks
    the package will hold."""
    for name, value in model.state_dict().items():
        if _stored_in_half(name, value):
            value.copy_(value.half())
    return model


def slice_outputs(
    members: list[EfficientNetLite], x: torch.Tensor, *, class_maps: bool = False
) -> dict[str, torch.Tensor]:
    """Run every member on a batch (B, 3, S, S): logits (M, B, 6) and embeddings (M, B, E); with
    ``class_maps`` also each member's class evidence maps (M, B, 6, h, w) for Grad-CAM."""
    logits, embeddings, maps = [], [], []
    for model in members:
        features = model.forward_features(x)  # (B, E, h, w)
        logits.append(model.forward_head(features))
        embeddings.append(model.pool(features))
        if class_maps:
            maps.append(model.forward_maps(features))
    out = {"logits": torch.stack(logits), "embeddings": torch.stack(embeddings)}
    if class_maps:
        out["class_maps"] = torch.stack(maps)
    return out


def shared_slice_outputs(
    heads: list[list[EfficientNetLite]], x: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    """``slice_outputs`` (with class maps) for several member lists that share their networks
    and differ in their linear heads: each member's last stage is computed once, by the first
    list's member, and read by every list's head."""
    logits: list[list[torch.Tensor]] = [[] for _ in heads]
    embeddings: list[torch.Tensor] = []
    maps: list[list[torch.Tensor]] = [[] for _ in heads]
    for m, model in enumerate(heads[0]):
        features = model.forward_features(x)  # (B, E, h, w)
        embeddings.append(model.pool(features))
        for i, members in enumerate(heads):
            logits[i].append(members[m].forward_head(features))
            maps[i].append(members[m].forward_maps(features))
    pooled = torch.stack(embeddings)
    return [
        {"logits": torch.stack(lo), "embeddings": pooled, "class_maps": torch.stack(ma)}
        for lo, ma in zip(logits, maps, strict=True)
    ]


def check_same_networks(a: "ModelPackage", b: "ModelPackage") -> None:
    """Raises ValueError unless b has a's preprocessing and networks (every weight but the
    linear heads'), as a package from ``ich refit-heads`` has its source's."""
    where = f"{b.name} {b.version} against {a.name} {a.version}"
    if a.preprocess != b.preprocess:
        raise ValueError(f"{where}: the preprocessing differs")
    if [m.variant for m in a.members] != [m.variant for m in b.members]:
        raise ValueError(f"{where}: the ensemble's members differ")
    for ma, mb in zip(a.members, b.members, strict=True):
        if ma.output_stride != mb.output_stride:
            raise ValueError(f"{where}: {ma.variant}'s output stride differs")
        sb = mb.state_dict()
        for key, value in ma.state_dict().items():
            if not key.startswith("fc.") and not torch.equal(value, sb[key]):
                raise ValueError(f"{where}: {ma.variant} differs in {key}")


def aggregator_features(logits: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """(M, N, 6) and (M, N, E) -> (N, M * (E + 6)): what the study aggregator reads per slice."""
    return torch.cat(
        [torch.cat([logits[m], embeddings[m]], dim=-1) for m in range(len(logits))], -1
    )
