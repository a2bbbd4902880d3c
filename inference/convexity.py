"""Extra-axial blood read along the convexity, at the scan's own resolution.

Subdural and epidural blood lie between the brain and the inner table of the skull, and blood
in the sulci of the convexity a few millimetres further in. Each slice is unrolled into a
strip: one column per ray from the head's centre, one row per depth inward from the inner table
(0.5 mm steps, 32 mm deep). In the strip a subdural is a long thin band along the top, an
epidural a short thick lens, and sulcal blood short bright lines running down from the surface,
at the native pixel size rather than the 0.94 mm grid of the slice networks, so thin blood keeps
its few pixels. Blood deep in the basal cisterns lies outside the strip.

``ConvexityNet`` reads the strips of a slice and its neighbours and gives, per ray sector, a
logit per class it reads (subdural and epidural by default; subarachnoid when asked); a
slice's score is the maximum over its sectors.
"""

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.constants import CLASSES, SUBTYPES
from inference.models import fold_batch_norms, fused_conv, fused_convolutions_available

EXTRA_AXIAL = ("subdural", "epidural")  # the classes a reader reads unless told otherwise
STRIP_CLASSES = ("subdural", "epidural", "subarachnoid")  # those the strip can hold


def check_classes(classes: tuple[str, ...]) -> tuple[str, ...]:
    classes = tuple(classes)
    unknown = [c for c in classes if c not in STRIP_CLASSES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(
            f"the strips read {', '.join(STRIP_CLASSES)}, each at most once; got {classes}"
        )
    return classes


AIR_HU = -1000.0


@dataclass(frozen=True)
class StripConfig:
    angles: int = 360  # rays per slice
    depth_mm: float = 32.0  # how far inward from the inner table the strip reaches
    step_mm: float = 0.5  # sample spacing along each ray
    max_radius_mm: float = 130.0
    bone_hu: float = 300.0
    min_inner_radius_mm: float = 30.0  # a ray whose skull starts closer to the centre is invalid

    @property
    def depth(self) -> int:
        return round(self.depth_mm / self.step_mm)

    @property
    def samples(self) -> int:
        return round(self.max_radius_mm / self.step_mm)


@dataclass
class Strips:
    hu: np.ndarray  # (N, D, A) float32 HU; row 0 touches the inner table
    valid: np.ndarray  # (N, A) bool: the ray found the skull
    labels: np.ndarray | None = None  # (N, C, A) uint8: blood of each read class in the strip


def _ray_grid(
    centres_px: torch.Tensor, spacing: tuple[float, float], shape: tuple[int, int], cfg: StripConfig
) -> torch.Tensor:
    """Sample points of every ray as grid_sample coordinates."""
    angle = torch.arange(cfg.angles, dtype=torch.float32) * (2 * math.pi / cfg.angles)
    radius = torch.arange(cfg.samples, dtype=torch.float32) * cfg.step_mm  # (K,)
    rows = centres_px[:, 0, None, None] + (
        radius[None, None, :] * torch.sin(angle)[None, :, None] / spacing[0]
    )  # (N, A, K)
    cols = centres_px[:, 1, None, None] + (
        radius[None, None, :] * torch.cos(angle)[None, :, None] / spacing[1]
    )
    height, width = shape
    return torch.stack(
        (cols / (width - 1) * 2 - 1, rows / (height - 1) * 2 - 1), dim=-1
    )  # (N, A, K, 2)


def _head_centres(hu: torch.Tensor) -> torch.Tensor:
    """Centroid of the tissue in each slice, in pixels (row, col); the image centre when empty."""
    tissue = (hu > -200).float()  # (N, H, W)
    weight = tissue.sum(dim=(1, 2)).clamp(min=1.0)
    rows = torch.arange(hu.shape[1], dtype=torch.float32)
    cols = torch.arange(hu.shape[2], dtype=torch.float32)
    centre_r = (tissue.sum(dim=2) * rows).sum(dim=1) / weight
    centre_c = (tissue.sum(dim=1) * cols).sum(dim=1) / weight
    empty = tissue.sum(dim=(1, 2)) < 1
    centre_r[empty] = (hu.shape[1] - 1) / 2
    centre_c[empty] = (hu.shape[2] - 1) / 2
    return torch.stack((centre_r, centre_c), dim=1)  # (N, 2)


def _inner_table(profiles: torch.Tensor, cfg: StripConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the inner table on each ray: where the outermost run of bone begins.

    The outermost run is the skull itself, so a calcified falx or plexus nearer the centre
    does not stop the ray.
    """
    bone = profiles > cfg.bone_hu  # (N, A, K)
    index = torch.arange(profiles.shape[-1])
    last_bone = torch.where(bone, index, -1).amax(dim=-1)  # (N, A)
    soft_before = (~bone) & (index < last_bone[..., None])
    inner = torch.where(soft_before, index, -1).amax(dim=-1) + 1  # (N, A)
    valid = (last_bone >= 0) & (inner * cfg.step_mm >= cfg.min_inner_radius_mm)
    return inner, valid


def convexity_strips(
    hu: np.ndarray,
    pixel_spacing_mm: tuple[float, float],
    cfg: StripConfig | None = None,
    masks: np.ndarray | None = None,
    classes: tuple[str, ...] = EXTRA_AXIAL,
) -> Strips:
    """Unroll each slice (and, for training, its blood masks) along the inner table."""
    cfg = cfg or StripConfig()
    volume = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))  # (N, H, W)
    shape = (volume.shape[1], volume.shape[2])
    grid = _ray_grid(_head_centres(volume), pixel_spacing_mm, shape, cfg)
    profiles = (
        F.grid_sample((volume - AIR_HU)[:, None], grid, align_corners=True)[:, 0] + AIR_HU
    )  # (N, A, K)
    inner, valid = _inner_table(profiles, cfg)
    depth_index = inner[..., None] - 1 - torch.arange(cfg.depth)  # (N, A, D)
    inside = (depth_index >= 0) & valid[..., None]
    strips = torch.gather(profiles, 2, depth_index.clamp(min=0))
    strips = torch.where(inside, strips, torch.full_like(strips, AIR_HU))
    labels = None
    if masks is not None:
        labels = _strip_labels(masks, grid, depth_index, inside, check_classes(classes))
    return Strips(hu=strips.transpose(1, 2).numpy(), valid=valid.numpy(), labels=labels)


def _strip_labels(
    masks: np.ndarray,
    grid: torch.Tensor,
    depth_index: torch.Tensor,
    inside: torch.Tensor,
    classes: tuple[str, ...],
) -> np.ndarray:
    bits = torch.from_numpy(np.ascontiguousarray(masks))
    planes = torch.stack(
        [(bits & (1 << SUBTYPES.index(name))) > 0 for name in classes], dim=1
    ).float()  # (N, C, H, W)
    along = F.grid_sample(planes, grid, mode="nearest", align_corners=True)  # (N, C, A, K)
    index = depth_index.clamp(min=0)[:, None].expand(-1, len(classes), -1, -1)  # (N, C, A, D)
    in_strip = torch.gather(along, 3, index) * inside[:, None]
    return (in_strip.amax(dim=3) > 0).to(torch.uint8).numpy()  # (N, C, A)


def neighbours(count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Index of each slice's neighbour below and above (series are sorted by position; the
    slice itself at the borders), for a series stored from ``offset`` on."""
    order = np.arange(count)
    return offset + np.maximum(order - 1, 0), offset + np.minimum(order + 1, count - 1)


def _blood(hu: torch.Tensor) -> torch.Tensor:
    return ((hu.float() + 10.0) / 110.0).clamp(0, 1)


def strip_channels(
    strips: torch.Tensor, index: torch.Tensor, below: torch.Tensor, above: torch.Tensor
) -> torch.Tensor:
    """Network input for the slices ``index`` of ``strips`` (M, D, A) HU: the slice and its
    neighbours below and above in a blood window (-10..100 HU), and the slice in a wide window
    that shows the bone's partial volume."""
    own = strips[index]  # (B, D, A)
    wide = ((own.float() + 100.0) / 400.0).clamp(0, 1)
    channels = (_blood(strips[below[index]]), _blood(own), _blood(strips[above[index]]), wide)
    return torch.stack(channels, dim=1)  # (B, 4, D, A)


class _CircularConv(nn.Module):
    """3x3 convolution that wraps around the angle axis and pads the depth axis with zeros."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, bias=False)
        self.norm: nn.Module = nn.BatchNorm2d(c_out)
        self.fused = False  # set by ``folded_strip_net`` where fused convolutions run (CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 0, 0), mode="circular")
        if self.fused and x.device.type == "cpu":  # zero depth padding and ReLU in the call
            return fused_conv(x, self.conv, act="relu", padding=(1, 0))
        x = F.pad(x, (0, 0, 1, 1))
        return F.relu(self.norm(self.conv(x)))


class ConvexityNet(nn.Module):
    """Strips (B, 4, D, A) -> per-sector logits of each read class (B, C, A / 8)."""

    def __init__(self, width: int = 16, classes: tuple[str, ...] = EXTRA_AXIAL) -> None:
        super().__init__()
        self.width = width
        self.classes = check_classes(classes)
        widths = (width, width * 2, width * 4, width * 6)
        layers: list[nn.Module] = []
        c_in = 4
        for i, c_out in enumerate(widths):
            layers.append(_CircularConv(c_in, c_out))
            if i > 0:  # full resolution gets one convolution only: it holds most of the cost
                layers.append(_CircularConv(c_out, c_out))
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        # Along the convexity: dilated circular 1D convolutions see a lesion's whole length.
        self.dilations = (1, 2, 4, 8)
        self.along = nn.ModuleList(
            nn.Conv1d(c_in, c_in, 3, dilation=d, padding=0) for d in self.dilations
        )
        self.head = nn.Conv1d(c_in, len(self.classes), 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C, D/8, A/8)
        x = x.amax(dim=2)  # (B, C, A/8)
        for conv, pad in zip(self.along, self.dilations, strict=True):
            x = x + F.relu(conv(F.pad(x, (pad, pad), mode="circular")))
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)  # (B, C, A/8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @staticmethod
    def slice_logits(sector_logits: torch.Tensor) -> torch.Tensor:
        return sector_logits.amax(dim=2)  # (B, C)


def folded_strip_net(net: ConvexityNet) -> ConvexityNet:
    """A copy of ``net`` for inference only: its batch norms folded (``fold_batch_norms``),
    the weights in channels-last memory."""
    folded = copy.deepcopy(net)
    layers = [m for m in folded.modules() if isinstance(m, _CircularConv)]
    fold_batch_norms(folded, [(layer, "conv", "norm") for layer in layers])
    for parameter in folded.parameters():
        if parameter.dim() == 4:
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
    if fused_convolutions_available() and next(folded.parameters()).device.type == "cpu":
        for layer in layers:
            layer.fused = True
    return folded


# Below this share of rays that found the skull, a slice is not read (skull base, vertex, a
# windowed 8-bit picture whose bone is clipped to the brain window).
MIN_VALID_RAYS = 0.5
STRIP_CHUNK = 32  # slices unrolled at once: bounds the ray profiles' memory on long series


def series_strips(
    hu: np.ndarray, pixel_spacing_mm: tuple[float, float], cfg: StripConfig
) -> tuple[torch.Tensor, np.ndarray]:
    """Strips (N, D, A) float32 HU of a whole series, unrolled in chunks, and each slice's
    share of valid rays (N,)."""
    parts, valid = [], []
    for start in range(0, len(hu), STRIP_CHUNK):
        strips = convexity_strips(hu[start : start + STRIP_CHUNK], pixel_spacing_mm, cfg)
        parts.append(torch.from_numpy(strips.hu))
        valid.append(strips.valid.mean(axis=1))
    return torch.cat(parts), np.concatenate(valid)


def either_logits(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The fused logits (S,) of an "either" fusion (`ConvexityReader.either`, fitted by
    `convexity_fit.fit_either`) of (S, 2) features: the ensemble's logit, the strips' evidence."""
    w_e, b_e, w_s, b_s, a, b = params
    return a * np.maximum(w_e * x[:, 0] + b_e, w_s * x[:, 1] + b_s) + b


class ConvexityReader:
    """The strip network of a model package and how its evidence joins the ensemble's.

    ``fusion`` holds, per class of CLASSES, (w_ensemble, w_strips, bias): the class's study
    logit becomes w_ensemble * (the ensemble's calibrated logit) + w_strips * (the strip
    network's study logit) + bias, fitted by logistic regression on studies neither network
    trained on. A row of NaN leaves the class to the ensemble, and so does a series with no
    slice the strips can read. The package's operating points are chosen on the fused scores;
    ``ensemble_thresholds`` (6,) are the ensemble's own, which flag a series the strips could
    not read (its scores are the ensemble's alone).

    ``cross`` (6, 6), when given, lets a fused class also read the other classes: row c adds
    sum_j cross[c, j] * (the ensemble's own calibrated logit of class j, before any reader
    joined) to class c's fused logit, so evidence of another bleed can explain away what looks
    like class c (a cross-class fusion, `ich convexity --cross`). Rows of classes not fused
    are zero.

    ``floors`` (6,), when given, put a floor under the ensemble's logit of each fused class
    before its weight applies (-inf: none; `ich convexity --floor`): below it, how sure the
    ensemble is that a study is normal stops counting against the strips' evidence.

    ``either`` (6, 6), when given, fuses a class whose row is finite in the "either" form
    (`ich convexity --either`), for a class two readers see in different places: its row
    (w_e, b_e, w_s, b_s, a, b) makes the study logit
    a * max(w_e * (the ensemble's logit) + b_e, w_s * (the strips' evidence) + b_s) + b, so
    either reader alone can raise it. Such a class's ``fusion`` row is NaN."""

    def __init__(
        self,
        net: ConvexityNet,
        strips: StripConfig,
        fusion: np.ndarray,
        ensemble_thresholds: np.ndarray | None = None,
        cross: np.ndarray | None = None,
        floors: np.ndarray | None = None,
        either: np.ndarray | None = None,
    ) -> None:
        self.net = net.eval()
        self._inference_net: ConvexityNet | None = None
        self.strips = strips
        self.fusion = np.asarray(fusion, dtype=np.float64)  # (6, 3)
        self.ensemble_thresholds = (
            None if ensemble_thresholds is None else np.asarray(ensemble_thresholds, np.float64)
        )
        self.cross = None if cross is None else np.asarray(cross, dtype=np.float64)  # (6, 6)
        self.floors = None if floors is None else np.asarray(floors, dtype=np.float64)  # (6,)
        self.either = None if either is None else np.asarray(either, dtype=np.float64)  # (6, 6)

    def to_state(self) -> dict:
        state = {
            "strips": vars(self.strips).copy(),
            "width": self.net.width,
            "classes": list(self.net.classes),
            "state": self.net.state_dict(),
            "fusion": torch.from_numpy(self.fusion),
        }
        if self.ensemble_thresholds is not None:
            state["ensemble_thresholds"] = torch.from_numpy(self.ensemble_thresholds)
        if self.cross is not None:
            state["cross"] = torch.from_numpy(self.cross)
        if self.floors is not None:
            state["floors"] = torch.from_numpy(self.floors)
        if self.either is not None:
            state["either"] = torch.from_numpy(self.either)
        return state

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "ConvexityReader":
        classes = tuple(state.get("classes", EXTRA_AXIAL))  # 6.5.0 read the two extra-axial
        net = ConvexityNet(width=int(state["width"]), classes=classes)
        net.load_state_dict(state["state"])
        fallback = state.get("ensemble_thresholds")
        cross = state.get("cross")  # packages before 6.12.0 have none
        floors = state.get("floors")  # nor before 6.13.0
        either = state.get("either")
        return cls(
            net.to(device),
            StripConfig(**state["strips"]),
            state["fusion"].numpy(),
            None if fallback is None else fallback.numpy(),
            None if cross is None else cross.numpy(),
            None if floors is None else floors.numpy(),
            None if either is None else either.numpy(),
        )

    @torch.no_grad()
    def slice_logits(
        self,
        hu: np.ndarray,
        pixel_spacing_mm: tuple[float, float],
        batch_size: int = 16,
        unrolled: tuple[torch.Tensor, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits per slice of each read class (N, C), NaN on the slices that could not be
        read (the network does not run on them), and which slices could be read (N,).
        ``unrolled``: the series' strips as `series_strips` made them with this reader's
        StripConfig, when another reader has unrolled them already."""
        strips, valid = (
            series_strips(hu, pixel_spacing_mm, self.strips) if unrolled is None else unrolled
        )
        readable = valid >= MIN_VALID_RAYS
        below, above = (torch.from_numpy(i) for i in neighbours(len(strips)))
        device = next(self.net.parameters()).device
        net = self.inference_net()
        logits = np.full((len(strips), len(self.net.classes)), np.nan, dtype=np.float32)
        read = torch.from_numpy(np.flatnonzero(readable))
        for index in read.split(batch_size):
            x = strip_channels(strips, index, below, above).to(device)  # (B, 4, D, A)
            logits[index.numpy()] = net.slice_logits(net(x)).float().cpu().numpy()
        return logits, readable

    def inference_net(self) -> ConvexityNet:
        """``net`` with its batch norms folded and channels-last weights, made at the first
        read: the same logits within float rounding, about 1.4 times faster on CPU
        (docs/benchmarks.md). ``net`` stays as trained (it is what the package saves)."""
        if self._inference_net is None:
            self._inference_net = folded_strip_net(self.net)
        return self._inference_net

    def study_logits(
        self,
        hu: np.ndarray,
        pixel_spacing_mm: tuple[float, float] | None,
        unrolled: tuple[torch.Tensor, np.ndarray] | None = None,
    ) -> np.ndarray | None:
        """The strongest readable slice's logits (C,), or None when no slice is readable or the
        series has no pixel spacing (a windowed picture: its strips have no scale in mm)."""
        if pixel_spacing_mm is None:
            return None
        logits, readable = self.slice_logits(hu, pixel_spacing_mm, unrolled=unrolled)
        if not readable.any():
            return None
        return logits[readable].max(axis=0)

    def fused_classes(self) -> np.ndarray:
        """Indices into CLASSES of the classes this reader's evidence joins."""
        fused = ~np.isnan(self.fusion).any(axis=1)
        if self.either is not None:
            fused |= ~np.isnan(self.either).any(axis=1)
        return np.flatnonzero(fused)

    def unread_thresholds(self, thresholds: np.ndarray) -> np.ndarray:
        """The operating points for a series this reader could not read: its fused classes go
        back to the thresholds they had before it joined (``ensemble_thresholds``)."""
        out = np.array(thresholds, dtype=np.float64)
        if self.ensemble_thresholds is not None:
            fused = self.fused_classes()
            out[fused] = self.ensemble_thresholds[fused]
        return out

    def fuse(
        self,
        calibrated_logits: np.ndarray,
        strip_logits: np.ndarray | None,
        ensemble_logits: np.ndarray | None = None,
    ) -> np.ndarray:
        """Study logits (6,) after the strips' evidence joins: see the class docstring.
        ``ensemble_logits``: the ensemble's own calibrated logits before any reader joined
        (``calibrated_logits`` when none has); a cross-class fusion reads them."""
        fused = np.array(calibrated_logits, dtype=np.float64)
        if strip_logits is None:
            return fused
        own = fused.copy() if ensemble_logits is None else np.asarray(ensemble_logits, np.float64)
        evidence = strip_features(strip_logits[None], self.net.classes)[0]  # (6,)
        for c in range(len(CLASSES)):
            if self.either is not None and not np.isnan(self.either[c]).any():
                pair = np.array([[fused[c], evidence[c]]])
                fused[c] = either_logits(pair, self.either[c])[0]
            elif not np.isnan(self.fusion[c]).any():
                w_ensemble, w_strips, bias = self.fusion[c]
                if self.floors is not None:
                    fused[c] = max(fused[c], self.floors[c])
                fused[c] = w_ensemble * fused[c] + w_strips * evidence[c] + bias
                if self.cross is not None:
                    fused[c] += float(self.cross[c] @ own)
        return fused


def readers_study_logits(
    readers: list[ConvexityReader],
    hu: np.ndarray,
    pixel_spacing_mm: tuple[float, float] | None,
) -> list[np.ndarray | None]:
    """Each reader's study logits (see ConvexityReader.study_logits); readers with the same
    strip settings share one unrolling of the series."""
    unrolled: dict[StripConfig, tuple[torch.Tensor, np.ndarray]] = {}
    out = []
    for reader in readers:
        if pixel_spacing_mm is not None and reader.strips not in unrolled:
            unrolled[reader.strips] = series_strips(hu, pixel_spacing_mm, reader.strips)
        out.append(reader.study_logits(hu, pixel_spacing_mm, unrolled.get(reader.strips)))
    return out


def evidence_classes(classes: Sequence[str] = EXTRA_AXIAL) -> set[str]:
    """The classes a reader of ``classes`` gives evidence for (the columns ``strip_features``
    fills): its own and "any"."""
    return {"any", *classes}


def strip_features(strip_logits: np.ndarray, classes: tuple[str, ...] = EXTRA_AXIAL) -> np.ndarray:
    """(S, C) strip logits of ``classes`` -> (S, 6): the strip evidence each class reads, its
    own column, "any" the largest (NaN for classes the strips do not read)."""
    out = np.full((len(strip_logits), len(CLASSES)), np.nan)
    out[:, CLASSES.index("any")] = strip_logits.max(axis=1)
    for column, name in enumerate(classes):
        out[:, CLASSES.index(name)] = strip_logits[:, column]
    return out
