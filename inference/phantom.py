"""Synthetic head CT ("phantom") studies with ground-truth haemorrhage labels and masks.

Every study is a plausible non-contrast head CT rendered straight into Hounsfield units at
512 x 512: scalp, a skull with inner and outer tables and diploe, a stepped skull base with
petrous bones, sinuses, mastoid air cells and orbits, grey and white matter with sulci, the
ventricular system, basal cisterns, Sylvian and interhemispheric fissures, falx, tentorium,
venous sinuses, brainstem and cerebellum. Blood of each subtype sits in its typical place with
its typical shape and density, and its volume is controlled exactly through the mask.

Anatomy, lesions, mimics and noise come from independent random streams of the same seed, so
the same seed with and without haemorrhage gives the same head: nothing but the blood (and the
oedema around a parenchymal haematoma) differs between a positive and a negative study, and
the mimics (falx / choroid / pineal calcification, petrous beam hardening, dense venous
sinuses) are drawn independently of the label.

All rendering is vectorised numpy, one slice at a time (cache friendly): shapes are signed
distance fields with soft edges (partial volume, including across the slab thickness), and
textures are band-limited random fields evaluated with separable matrix products. The module
never imports Django; pydicom is imported only when files are written.

Limits: blood is acute (hyperdense) only, there is no mass effect (no midline shift or
effacement), and the skull base is schematic (fossae, ridges, sinuses and orbits, not every
foramen). Studies are for development, tests, benchmarks and demos, never for clinical claims.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import math
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from inference.constants import AIR_HU, CLASSES, CT_IMAGE_STORAGE, SIZES, SUBTYPES

__all__ = [
    "MIMICS",
    "MIN_PIXELS",
    "SIZES",
    "PhantomStudy",
    "PhantomSummary",
    "generate_study",
    "sop_instance_uids",
    "write_dataset",
    "write_study",
]

SIZE = 512
MIN_PIXELS = 20  # a slice is positive for a subtype with at least this many mask pixels
MIMICS = (
    "falx_calcification",
    "choroid_plexus_calcification",
    "pineal_calcification",
    "beam_hardening",
    "dense_venous_sinus",
)
PADDING_HU = -2000  # outside the circular field of view on studies that declare padding
_TOTAL_ML = {
    "tiny": (0.4, 4.6),
    "small": (5.0, 15.0),
    "medium": (15.0, 40.0),
    "large": (45.0, 100.0),
}
_SIZE_P = (0.2, 0.35, 0.3, 0.15)
# The most blood of a subtype one study holds (mL): 30 mL of IVH already casts the ventricles.
_CAPACITY_ML = {
    "intraparenchymal": 90.0,
    "intraventricular": 30.0,
    "subdural": 110.0,
    "epidural": 90.0,
    "subarachnoid": 30.0,
}
_BIT = {name: 1 << i for i, name in enumerate(SUBTYPES)}
_F32 = np.float32
_CHUNK = 16  # slices per batch of random-field matrix products


# --------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------


@dataclass
class PhantomStudy:
    """One synthetic head CT series with its ground truth.

    ``hu`` holds exactly what the written DICOM decodes to: Hounsfield units, with
    ``PADDING_HU`` outside the circular field of view when ``padded`` is true (the files then
    declare a PixelPaddingValue) and -1024 there otherwise.
    """

    study_id: str
    hu: np.ndarray  # (N, H, W) int16, slice 0 = most inferior
    masks: np.ndarray  # (N, H, W) uint8 bit flags, bit i = SUBTYPES[i]
    slice_labels: np.ndarray  # (N, 6) uint8 in CLASSES order
    labels: dict[str, int]
    volumes_ml: dict[str, float]
    pixel_spacing_mm: float
    slice_thickness_mm: float
    positions_mm: np.ndarray  # (N,) slice centre z in mm, ascending
    mimics: list[str]  # hard mimics visible in the scanned slices (any label)
    seed: int = 0
    size: str | None = None  # None for a negative study
    padded: bool = False
    noise_sigma_hu: float = 0.0
    # generate_study's arguments that differ from their defaults ("" for a default study).
    # They change the pixels of a study id, so they enter its UIDs (write_study).
    variant: str = ""

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])


@dataclass
class PhantomSummary:
    """What write_dataset keeps of each study (no pixel arrays)."""

    study_id: str
    directory: Path
    labels: dict[str, int]
    volumes_ml: dict[str, float]
    n_slices: int
    mimics: list[str]  # hard mimics visible in the scanned slices (any label)
    size: str | None
    sop_instance_uids: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------------------------


def _ramp(sd: np.ndarray, inv_w: float | np.ndarray) -> np.ndarray:
    """Coverage of the region sd < 0 for a pixel whose edge is 1/inv_w wide (box partial volume)."""
    out = np.multiply(sd, inv_w, dtype=_F32)
    np.subtract(0.5, out, out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def _lerp_(a: np.ndarray, b: float | np.floating | np.ndarray, t: np.ndarray) -> None:
    """a += (b - a) * t, in place."""
    a += (b - a) * t


def _stable_int(*parts: object) -> int:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class _Field:
    """A unit-variance band-limited Gaussian random field over the image plane and z.

    f(x, y, z) = sum_ijk N_ijk g(x - x_i) g(y - y_j) h(z - z_k), evaluated one slice at a time
    as Wr @ P(z) @ Wc.T (two small matrix products) over a crop of the image. Node planes are
    drawn lazily from their own seeds, so the field is deterministic and only the planes a
    study touches are ever generated.
    """

    def __init__(
        self,
        seed: int,
        px: float,
        sigma: float,
        sigma_z: float,
        rows: slice = slice(0, SIZE),
        cols: slice = slice(0, SIZE),
        grad: bool = False,
    ) -> None:
        coords = (np.arange(SIZE) - (SIZE - 1) / 2) * px
        mats = []
        for sl in (rows, cols):
            c = coords[sl]
            nodes = np.arange(c[0] - 3 * sigma, c[-1] + 3 * sigma + sigma, sigma)
            d = c[:, None] - nodes[None, :]
            w = np.exp(-0.5 * (d / sigma) ** 2)
            norm = np.sqrt((w**2).sum(1, keepdims=True))
            mats.append(((w / norm).astype(_F32), (-d / sigma**2 * w / norm).astype(_F32)))
        (self.wr, self.dwr), (self.wc, self.dwc) = mats
        self.grad = grad
        self.seed = seed
        self.sigma_z = sigma_z
        self.shape = (self.wr.shape[1], self.wc.shape[1])
        self._planes: dict[int, np.ndarray] = {}
        self._last: tuple[float, np.ndarray] | None = None

    def _plane(self, z: float) -> np.ndarray:
        if self._last is not None and self._last[0] == z:
            return self._last[1]
        sz = self.sigma_z
        ks = np.arange(math.floor(z / sz - 3), math.ceil(z / sz + 3) + 1)
        wz = np.exp(-0.5 * ((z - ks * sz) / sz) ** 2)
        wz /= np.sqrt((wz**2).sum())
        out = np.zeros(self.shape, _F32)
        for k, wk in zip(ks.tolist(), wz.tolist(), strict=True):
            plane = self._planes.get(k)
            if plane is None:
                rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.seed >> 32, k + 100000])
                plane = rng.standard_normal(self.shape, dtype=_F32)
                self._planes[k] = plane
            out += _F32(wk) * plane
        self._last = (z, out)
        return out

    def schedule(self, zs: Sequence[float]) -> None:
        """Slices about to be asked for, in order: they are evaluated a chunk at a time, a few
        large matrix products instead of many small ones (far kinder to a busy machine)."""
        self._todo = list(zs)
        self._cache: dict[float, tuple[np.ndarray, ...]] = {}

    def _eval(self, z: float) -> tuple[np.ndarray, ...]:
        todo = getattr(self, "_todo", [])
        hit = self._cache.pop(z, None) if todo else None
        if hit is not None:
            return hit
        zlist = [z]
        if z in todo:
            start = todo.index(z)
            zlist = todo[start : start + _CHUNK]
        k, nc = len(zlist), self.shape[1]
        rows, cols = self.wr.shape[0], self.wc.shape[0]
        planes = np.concatenate([self._plane(zz) for zz in zlist], axis=1)  # (nr, k * nc)

        def through_cols(a: np.ndarray, w: np.ndarray) -> np.ndarray:
            stacked = a.reshape(rows, k, nc).transpose(1, 0, 2).reshape(k * rows, nc)
            return (stacked @ w.T).reshape(k, rows, cols)

        a = self.wr @ planes
        outs = [through_cols(a, self.wc)]
        if self.grad:
            outs += [through_cols(a, self.dwc), through_cols(self.dwr @ planes, self.wc)]
        results = [tuple(o[j] for o in outs) for j in range(k)]
        if todo:
            self._cache.update(zip(zlist[1:], results[1:], strict=True))
        return results[0]

    def value(self, z: float) -> np.ndarray:
        return self._eval(z)[0]

    def value_grad(self, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Value and its derivatives along columns (x) and rows (y), per mm."""
        f, fx, fy = self._eval(z)
        return f, fx, fy


# --------------------------------------------------------------------------------------------
# Anatomy: parameters, fixed in-plane maps and z-keyframed structures
# --------------------------------------------------------------------------------------------

_Frames = list[tuple[float, float, float, float, float, float]]

# Keyframes (z mm relative to the widest cranial level, lateral mm (left +), anterior mm,
# half-width, half-length, angle deg) for a reference cranium with inner semi-axes 66 x 86 mm.
# "mirror" structures are drawn on both sides (lateral and angle negated on the right).
_VENTRICLES: dict[str, _Frames] = {
    "frontal_horn": [
        (-13, 6.5, 24, 0, 0, -25),
        (-8, 6.5, 24, 3.5, 9, -25),
        (0, 7.5, 22, 5.5, 12, -22),
        (8, 8.5, 20, 6, 13, -15),
        (14, 9, 17, 4, 10, -10),
        (17, 9.5, 16, 0, 0, -10),
    ],
    "body": [
        (5, 9.5, 8, 0, 0, -4),
        (10, 10, 6, 5, 20, -4),
        (18, 10.5, 2, 6, 24, -5),
        (26, 10, -2, 4.5, 20, -6),
        (32, 9, -4, 0, 0, -6),
    ],
    "atrium": [
        (-11, 19, -30, 0, 0, 25),
        (-5, 20, -31, 5, 9, 25),
        (2, 21, -34, 8, 13, 25),
        (8, 19, -30, 7, 12, 18),
        (14, 16, -25, 4, 10, 10),
        (17, 15, -22, 0, 0, 10),
    ],
    "temporal_horn": [
        (-35, 27, 0, 0, 0, 15),
        (-30, 27, -2, 2.5, 7, 15),
        (-22, 26, -10, 3.2, 9, 25),
        (-14, 24, -18, 2.5, 8, 25),
        (-10, 23, -20, 0, 0, 25),
    ],
}
_MIDLINE_VENTRICLES: dict[str, _Frames] = {
    "third": [
        (-24, 0, -3, 0, 0, 0),
        (-20, 0, -3, 1.6, 9, 0),
        (-12, 0, -4, 2.6, 11, 0),
        (-2, 0, -3, 2.2, 10, 0),
        (2, 0, -2, 0, 0, 0),
    ],
    "fourth": [
        (-63, 0, -33, 0, 0, 0),
        (-58, 0, -33, 4, 3, 0),
        (-50, 0, -32, 7.5, 4.5, 0),
        (-43, 0, -31, 5, 3, 0),
        (-39, 0, -30, 0, 0, 0),
    ],
}
_CISTERNS: dict[str, _Frames] = {
    "prepontine": [
        (-64, 0, -3, 0, 0, 0),
        (-58, 0, -3, 9, 3.5, 0),
        (-45, 0, -2, 13, 4, 0),
        (-36, 0, -2, 11, 4, 0),
        (-32, 0, -1, 0, 0, 0),
    ],
    "ambient": [
        (-37, 0, -15, 0, 0, 0),
        (-33, 0, -16, 15, 12.5, 0),
        (-22, 0, -17, 13.5, 11.5, 0),
        (-18, 0, -17, 0, 0, 0),
    ],
    "suprasellar": [
        (-37, 0, 8, 0, 0, 0),
        (-33, 0, 8, 11, 8, 0),
        (-26, 0, 7, 12, 9, 0),
        (-21, 0, 6, 0, 0, 0),
    ],
    "quadrigeminal": [
        (-29, 0, -28, 0, 0, 0),
        (-25, 0, -28, 7, 5, 0),
        (-13, 0, -29, 6, 5, 0),
        (-9, 0, -29, 0, 0, 0),
    ],
    "magna": [
        (-84, 0, -62, 0, 0, 0),
        (-76, 0, -62, 9, 8, 0),
        (-64, 0, -60, 8, 6, 0),
        (-57, 0, -58, 0, 0, 0),
    ],
}
_SYLVIAN: dict[
    str, _Frames
] = {  # stem from the suprasellar cistern, then the cistern along the insula
    "stem": [
        (-35, 28, 10, 0, 0, 6),
        (-31, 29, 10, 16, 1.8, 6),
        (-24, 31, 9, 17, 2.0, 4),
        (-19, 32, 8, 0, 0, 0),
    ],
    "insular": [
        (-25, 44, 4, 0, 0, -12),
        (-20, 44, 4, 1.0, 6, -12),
        (-6, 45, 3, 1.3, 8, -10),
        (4, 46, 1, 1.0, 6, -8),
        (9, 46, 1, 0, 0, -8),
    ],
    "opening": [
        (-22, 51, 5, 0, 0, 18),
        (-18, 51, 5, 8, 1.5, 18),
        (-4, 52, 4, 9, 1.9, 12),
        (4, 53, 2, 0, 0, 10),
    ],
}
_DEEP_GREY: dict[str, _Frames] = {
    "caudate": [
        (-7, 14.5, 19, 0, 0, -20),
        (-2, 14.5, 19, 4, 7, -20),
        (8, 15, 17, 5, 8, -15),
        (16, 14.5, 13, 3.5, 7, -10),
        (22, 14, 9, 0, 0, -10),
    ],
    "lentiform": [
        (-21, 25, 4, 0, 0, -8),
        (-15, 25, 4, 5, 13, -8),
        (-5, 26, 4, 6.5, 16, -8),
        (4, 25, 4, 5, 12, -8),
        (9, 24, 4, 0, 0, -8),
    ],
    "thalamus": [
        (-19, 9, -10, 0, 0, 10),
        (-14, 9, -10, 6, 9, 10),
        (-4, 10, -11, 8, 12, 10),
        (6, 10, -11, 6, 10, 10),
        (10, 10, -11, 0, 0, 10),
    ],
    "insula": [
        (-18, 39, 2, 0, 0, -10),
        (-13, 39, 2, 2.5, 14, -10),
        (2, 40, 0, 3, 16, -10),
        (8, 40, 0, 0, 0, -10),
    ],
}
_STEM: _Frames = [
    (-110, 0, -24, 7, 7, 0),
    (-64, 0, -19, 8, 7.5, 0),
    (-57, 0, -17, 12.5, 10, 0),
    (-45, 0, -16, 14.5, 11.5, 0),
    (-37, 0, -16, 13, 11, 0),
    (-30, 0, -16, 12.5, 10, 0),
    (-22, 0, -16, 11, 9, 0),
    (-18, 0, -16, 0, 0, 0),
]
_CHOROID: _Frames = [
    (-4, 18, -33, 0, 0, 20),
    (-1, 18, -33, 2.2, 3.2, 20),
    (6, 18, -32, 2, 3, 20),
    (9, 18, -32, 0, 0, 20),
]
_BONE: dict[str, tuple[_Frames, bool]] = {  # mandibular rami and condyles, below the cranial floor
    "ramus": (
        [
            (-115, 47, 14, 0, 0, -8),
            (-105, 47, 14, 4, 10, -8),
            (-70, 48, 8, 4, 9, -8),
            (-62, 48, 6, 5, 7, -8),
            (-55, 48, 6, 0, 0, -8),
        ],
        True,
    ),
}
_AIR: dict[str, tuple[_Frames, bool]] = {  # below the cranial floor only
    "sphenoid": (
        [
            (-62, 0, 10, 0, 0, 0),
            (-57, 0, 10, 11, 9, 0),
            (-46, 0, 11, 12, 10, 0),
            (-40, 0, 12, 0, 0, 0),
        ],
        False,
    ),
    "maxillary": (
        [
            (-110, 29, 58, 0, 0, -10),
            (-100, 29, 58, 13, 15, -10),
            (-72, 30, 60, 14, 16, -10),
            (-60, 30, 62, 0, 0, -10),
        ],
        True,
    ),
    "nasal": (
        [
            (-110, 0, 62, 0, 0, 0),
            (-100, 0, 62, 7, 20, 0),
            (-66, 0, 62, 5, 15, 0),
            (-56, 0, 62, 0, 0, 0),
        ],
        False,
    ),
    "nasopharynx": (
        [
            (-115, 0, 34, 0, 0, 0),
            (-105, 0, 34, 10, 6, 0),
            (-74, 0, 36, 9, 5, 0),
            (-64, 0, 38, 0, 0, 0),
        ],
        False,
    ),
}
_ORBIT_FAT: _Frames = [
    (-60, 30, 56, 0, 0, -12),
    (-54, 30, 56, 14, 19, -12),
    (-36, 30, 55, 15, 20, -12),
    (-29, 30, 54, 0, 0, -12),
]
_GLOBE: _Frames = [
    (-57, 32, 62, 0, 0, 0),
    (-52, 32, 62, 8, 8, 0),
    (-44, 32, 62, 11.5, 11.5, 0),
    (-36, 32, 62, 8, 8, 0),
    (-31, 32, 62, 0, 0, 0),
]
# Fossae of the skull base as cups (centre lateral, centre anterior, half-width, half-length in
# units of the cranial semi-axes; rim z; depth mm): the cranial floor is their lower envelope,
# so ridges (sphenoid ridge, petrous ridges) form where neighbouring cups meet.
_CUPS = {
    "anterior": (0.0, 0.5, 0.95, 0.55, -4.0, 24.0),
    "middle_l": (0.58, 0.02, 0.42, 0.4, -12.0, 36.0),
    "middle_r": (-0.58, 0.02, 0.42, 0.4, -12.0, 36.0),
    "posterior": (0.0, -0.52, 0.84, 0.5, -36.0, 42.0),
    "sella": (0.0, 0.02, 0.2, 0.28, -18.0, 18.0),
    "foramen_magnum": (0.0, -0.3, 0.13, 0.15, -60.0, 60.0),
}


def _scale_frames(
    frames: Sequence[Sequence[float]],
    sa: float,
    sb: float,
    sw: float = 1.0,
    sl: float = 1.0,
    su: float | None = None,
    dz: float = 0.0,
    sz: float = 1.0,
) -> np.ndarray:
    arr = np.array(frames, dtype=np.float64)
    arr[:, 0] = arr[:, 0] * sz + dz
    arr[:, 1] *= sa if su is None else su
    arr[:, 2] *= sb
    arr[:, 3] *= sa * sw
    arr[:, 4] *= sb * sl
    return arr


@dataclass
class _Head:
    px: float
    thickness: float
    cx: float
    cy: float
    theta: float
    a: float
    b_ant: float
    b_post: float
    egg: float
    harm: list[tuple[int, float, float]]
    hz_up: float
    hz_low: float
    t_in: float
    t_dip: float
    t_out: float
    t_scalp: float
    hu_table: float
    hu_diploe: float
    hu_petrous: float
    hu_scalp: float
    hu_gm: float
    hu_wm: float
    hu_csf: float
    hu_sinus: float
    hu_falx: float
    vent_scale: float
    atrophy: float
    rim: float
    sulc_sigma: float
    noise_sigma: float
    blur: float
    padded: bool
    z_lo: float  # bottom of the scanned range, relative to the widest cranial level
    n: int
    table_z: float
    cup_jitter: dict[str, tuple[float, float]]
    seeds: tuple[int, int, int, int]

    @property
    def sa(self) -> float:
        return self.a / 66.0

    @property
    def sb(self) -> float:
        return (self.b_ant + self.b_post) / 2 / 86.0


def _sample_head(rng: np.random.Generator, thickness: float, n_slices: int | None) -> _Head:
    a = rng.uniform(62.0, 70.0)
    b_mean = rng.uniform(80.0, 91.0)
    asym = rng.uniform(-0.03, 0.04)
    b_ant, b_post = b_mean * (1 - asym), b_mean * (1 + asym)
    t_scalp = rng.uniform(3.5, 6.0)
    t_in, t_dip, t_out = rng.uniform(1.3, 2.0), rng.uniform(1.8, 4.0), rng.uniform(1.3, 2.2)
    outer = max(b_ant, b_post) * 1.04 + t_in + t_dip * 1.2 + t_out + t_scalp * 1.4
    off = rng.uniform(-5.0, 5.0, size=2)
    lo_px = max(0.4, 2 * (outer + np.abs(off).max() + 8.0) / SIZE)
    px = round(float(rng.uniform(lo_px, max(lo_px, 0.6))), 4)
    atrophy = float(rng.beta(1.6, 3.0))  # 0 young brain .. 1 marked involution
    hz_up = rng.uniform(68.0, 79.0)
    z_lo = -rng.uniform(80.0, 86.0)
    z_hi = hz_up + 0.6 * (t_in + t_dip + t_out) + rng.uniform(0.0, 4.0)
    if n_slices is None:
        n = math.ceil((z_hi - z_lo) / thickness)
        z_lo = (z_lo + z_hi) / 2 - n * thickness / 2
    else:
        n = int(n_slices)
        span = n * thickness
        if span >= z_hi - z_lo:
            z_lo = (z_lo + z_hi) / 2 - span / 2
        else:  # a partial series centred on the ventricles, kept inside the head
            z_lo = min(max(-span / 2, z_lo), z_hi - span)
    seeds = tuple(int(s) for s in rng.integers(0, 2**62, size=4))
    jitter = {k: (float(rng.uniform(-3, 3)), float(rng.uniform(0.9, 1.1))) for k in _CUPS}
    return _Head(
        px=px,
        thickness=thickness,
        cx=float(off[0]),
        cy=float(off[1]),
        theta=float(np.deg2rad(np.clip(rng.normal(0.0, 2.5), -6.0, 6.0))),
        a=a,
        b_ant=b_ant,
        b_post=b_post,
        egg=rng.uniform(0.03, 0.1),
        harm=[
            (k, rng.uniform(0.0, 0.012 / (k - 1)), rng.uniform(0, 2 * np.pi)) for k in range(2, 7)
        ],
        hz_up=hz_up,
        hz_low=rng.uniform(105.0, 135.0),
        t_in=t_in,
        t_dip=t_dip,
        t_out=t_out,
        t_scalp=t_scalp,
        hu_table=rng.uniform(1350.0, 1800.0),
        hu_diploe=rng.uniform(450.0, 750.0),
        hu_petrous=rng.uniform(1700.0, 2200.0),
        hu_scalp=rng.uniform(25.0, 45.0),
        hu_gm=rng.uniform(35.0, 41.0),
        hu_wm=rng.uniform(24.0, 30.0),
        hu_csf=rng.uniform(2.0, 9.0),
        hu_sinus=rng.uniform(40.0, 52.0),
        hu_falx=rng.uniform(55.0, 75.0),
        vent_scale=0.8 + 0.7 * atrophy + rng.uniform(-0.05, 0.15),
        atrophy=atrophy,
        rim=0.4 + 2.2 * atrophy * rng.uniform(0.6, 1.2),
        sulc_sigma=rng.uniform(2.3, 2.9),
        noise_sigma=rng.uniform(3.0, 8.0),
        blur=rng.uniform(0.5, 1.0),
        padded=bool(rng.random() < 0.35),
        z_lo=float(z_lo),
        n=n,
        table_z=round(float(rng.uniform(-160.0, -60.0)), 1),
        cup_jitter=jitter,
        seeds=seeds,  # type: ignore[arg-type]
    )


class _Blob:
    """A structure whose axial cross-section is an ellipse that changes along z (keyframes)."""

    def __init__(self, frames: np.ndarray, mirror: bool) -> None:
        self.frames = frames
        self.mirror = mirror
        self.z0 = float(frames[0, 0])
        self.z1 = float(frames[-1, 0])

    def params(self, z: float) -> tuple[float, float, float, float, float] | None:
        if z <= self.z0 or z >= self.z1:
            return None
        f = self.frames
        vals = [float(np.interp(z, f[:, 0], f[:, i])) for i in range(1, 6)]
        if vals[2] <= 0.05 or vals[3] <= 0.05:
            return None
        return vals[0], vals[1], vals[2], vals[3], vals[4]


def _with_band(full: np.ndarray, band: tuple[slice, slice], part: np.ndarray) -> np.ndarray:
    np.maximum(full[band], part, out=full[band])
    return full


def _sig(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(x, -30, 30)))


class _Renderer:
    """Renders the anatomy of one head, slice by slice, in Hounsfield units (no noise yet),
    over the crop of the image that holds the head."""

    def __init__(self, h: _Head, mimics: Sequence[str], mimic_rng: np.random.Generator) -> None:
        self.h = h
        px = h.px
        c = ((np.arange(SIZE) - (SIZE - 1) / 2) * px).astype(_F32)
        # the crop: the widest cross-section plus scalp, with a margin
        reach_x = h.a * 1.12 + 20.0 + abs(h.cx)
        reach_y = max(h.b_ant, h.b_post) * 1.05 + 20.0 + abs(h.cy)
        rx, ry = (
            reach_x + abs(math.sin(h.theta)) * reach_y,
            reach_y + abs(math.sin(h.theta)) * reach_x,
        )
        mid = (SIZE - 1) / 2
        cols = slice(max(0, int(mid - rx / px)), min(SIZE, int(mid + rx / px) + 2))
        rows = slice(max(0, int(mid - ry / px)), min(SIZE, int(mid + ry / px) + 2))
        self.rows, self.cols = rows, cols
        self.origin = (rows.start, cols.start)
        xs, ys = c[cols], c[rows]
        dx = xs[None, :] - _F32(h.cx)
        dy = ys[:, None] - _F32(h.cy)
        ct, st = _F32(math.cos(h.theta)), _F32(math.sin(h.theta))
        self.U = (dx * ct + dy * st).astype(_F32)  # lateral, patient left +
        self.W = (dx * st - dy * ct).astype(_F32)  # anterior +
        self.shape = self.U.shape
        self.Y = np.broadcast_to(ys[:, None], self.shape)  # scanner y, posterior +
        near = np.nonzero((np.abs(self.U) < 10.0).any(0))[0]  # columns around the midline
        self.mid = (slice(None), slice(int(near[0]), int(near[-1]) + 1))
        U, W = self.U, self.W
        bw = np.where(W > 0, _F32(h.b_ant), _F32(h.b_post))
        aw = h.a * (1 - h.egg * W / bw)
        nu, nw = U / aw, W / bw
        r = np.hypot(nu, nw) + _F32(1e-6)
        cphi, sphi = nu / r, nw / r
        phi = np.arctan2(nw, nu)
        mod = np.ones_like(r)
        for k, amp, ph in h.harm:
            mod += _F32(amp) * np.cos(k * phi + _F32(ph))
        r0 = (r / mod).astype(_F32)
        gy, gx = np.gradient(r0, px)
        g = np.hypot(gx, gy).astype(_F32) + _F32(1e-6)
        self.R0sq = r0 * r0
        self.R0G = r0 * g
        self.R0Gsq = self.R0G * self.R0G
        self.nx, self.ny = (gx / g).astype(_F32), (gy / g).astype(_F32)  # in-plane outward normal
        self.cphi, self.sphi = cphi.astype(_F32), sphi.astype(_F32)

        fb = np.abs(sphi)  # 1 front/back, 0 at the temples
        slow = _Field(h.seeds[0] ^ 0x5107, px, 12.0, 15.0, rows, cols)
        slow.schedule([0.0, 40.0, 80.0, 120.0, 160.0])  # five independent maps, one batch
        self.L1 = (h.t_in * (1 + 0.12 * slow.value(0.0))).astype(_F32)
        dip = h.t_dip * (0.35 + 0.85 * fb**1.5) * (1 + 0.2 * slow.value(40.0))
        self.L2 = (self.L1 + np.maximum(dip, 0.3)).astype(_F32)
        self.L3 = (self.L2 + h.t_out * (1 + 0.12 * slow.value(80.0))).astype(_F32)
        scalp = h.t_scalp * (1 + 0.35 * np.clip(-sphi, 0, 1)) * (1 + 0.1 * slow.value(120.0))
        self.L4 = (self.L3 + scalp).astype(_F32)
        self.rim = (h.rim * (1 + 0.6 * np.clip(sphi, 0, 1))).astype(_F32)
        self._floor_maps(nu.astype(_F32), nw.astype(_F32), r0, slow.value(160.0))

        sa, sb = h.sa, h.sb
        vs = h.vent_scale
        zs = 0.5 * (1 + h.hz_up / 73.0)  # keyframes above the equator follow the head height
        mk = _scale_frames
        self.vent = [
            _Blob(mk(f, sa, sb, sw=vs, sl=vs**0.5, su=sa * vs**0.35, sz=zs), True)
            for f in _VENTRICLES.values()
        ]
        self.vent += [
            _Blob(mk(f, sa, sb, sw=vs, sl=vs**0.3), False) for f in _MIDLINE_VENTRICLES.values()
        ]
        self.cist = [
            _Blob(mk(f, sa, sb, sw=1 + 0.3 * h.atrophy), False) for f in _CISTERNS.values()
        ]
        self.cist += [
            _Blob(mk(f, sa, sb, sw=0.8 + 1.0 * h.atrophy), True) for f in _SYLVIAN.values()
        ]
        self.deep = [
            _Blob(mk(f, sa, sb, su=sa * vs**0.25, sz=zs), True) for f in _DEEP_GREY.values()
        ]
        self.stem = _Blob(mk(_STEM, sa, sb), False)
        self.choroid = _Blob(mk(_CHOROID, sa, sb, su=sa * vs**0.35, sz=zs), True)
        self.air = [_Blob(mk(f, sa, sb), m) for f, m in _AIR.values()]
        self.jaw = [_Blob(mk(f, sa, sb), m) for f, m in _BONE.values()]
        self.orbit_fat = _Blob(mk(_ORBIT_FAT, sa, sb), True)
        self.globe = _Blob(mk(_GLOBE, sa, sb), True)

        self.f_sulc = _Field(h.seeds[1], px, h.sulc_sigma, 3.5, rows, cols, grad=True)
        self.f_fine = _Field(h.seeds[2], px, 1.1, 2.0, rows, cols)
        self.f_slow = _Field(h.seeds[3], px, 9.0, 12.0, rows, cols)
        self.mimics = list(mimics)
        self._mimic_setup(mimic_rng)

    # ---- fixed maps ---------------------------------------------------------------------
    def _floor_maps(
        self, nu: np.ndarray, nw: np.ndarray, r0: np.ndarray, relief: np.ndarray
    ) -> None:
        """The cranial floor (lower envelope of the fossae), the bone below it, the petrous
        bones, air-cell regions, the posterior fossa and the tentorium."""
        h = self.h
        au = np.abs(nu)
        floors = {}
        for name, (cu, cw, su, sw, rim, depth) in _CUPS.items():
            dz, k = h.cup_jitter[name]
            rho2 = ((nu - cu) / (su * k)) ** 2 + ((nw - cw) / sw) ** 2
            inside = np.clip(1 - rho2, 0, None)
            floors[name] = np.where(rho2 < 1, rim + dz - depth * k * np.sqrt(inside), np.inf)
        default = -6 - 10 * np.sqrt(np.clip(1 - r0 * r0, 0, None))
        post = np.minimum(floors["posterior"], floors["foramen_magnum"])
        # orbital roofs dome up either side of the cribriform groove
        roofs = 7 * np.exp(-(((au - 0.4) / 0.2) ** 2)) * _sig((nw - 0.25) / 0.05)
        anterior = floors["anterior"] + roofs - 5 * np.exp(-((nu / 0.08) ** 2))
        rest = (
            np.minimum.reduce(
                [anterior, floors["middle_l"], floors["middle_r"], floors["sella"], default]
            )
            + 3 * relief
        )
        self.F = np.minimum(post, rest).astype(_F32)
        self.Fmax = float(self.F.max())
        self.w_post = (_sig((rest - post) / 1.5) * (post < np.inf)).astype(_F32)
        # petrous ridge: from the apex by the clivus out to the mastoid
        nw_p = np.where(au < 0.12, 0.0, -0.55 * (au - 0.12))
        s2 = nw - nw_p
        petrous = np.exp(-((s2 / 0.085) ** 2)) * _sig((au - 0.14) / 0.03) * _sig((0.93 - au) / 0.04)
        tb = np.where(nw > 0.3, 3.0, 6.0) + 2.0 * (self.w_post > 0.5)
        sella = np.exp(-((nu / 0.2) ** 2) - ((nw - 0.06) / 0.22) ** 2)
        tb = tb + sella * (24 - tb)
        tb = tb + petrous * (34 - tb)
        mastoid = _sig((au - 0.6) / 0.04) * np.exp(-(((nw + 0.42) / 0.2) ** 2))
        tb = tb + mastoid * (24 - tb)
        self.TB = tb.astype(_F32)
        self.petrous = petrous.astype(_F32)
        self.cells = np.clip(mastoid, 0, 1).astype(_F32)
        self.ethmoid = (_sig((0.17 - au) / 0.03) * _sig((nw - 0.6) / 0.04)).astype(_F32)
        t = np.clip((nw + 0.97) / 0.67, 0, 1)
        lat = np.clip(1 - au / 0.85, 0, 1)
        self.TT = (-44 + 26 * t**0.8 * lat**0.7).astype(_F32)
        self.face = (_sig((nw - 0.55) / 0.05) * _sig((0.85 - au) / 0.05)).astype(_F32)

    def _mimic_setup(self, rng: np.random.Generator) -> None:
        h = self.h
        sa, sb = h.sa, h.sb
        zs = 0.5 * (1 + h.hz_up / 73.0)
        self.calc: list[tuple[str, _Blob, float]] = []
        self.seen: set[str] = set()  # mimics that showed on at least one rendered slice
        if "falx_calcification" in self.mimics:
            for _ in range(int(rng.integers(1, 3))):
                zc = rng.uniform(8.0, 50.0)
                cw = rng.choice([-1, 1]) * rng.uniform(25.0, 60.0)
                ln, th, dz = rng.uniform(4.0, 12.0), rng.uniform(0.8, 1.8), rng.uniform(2.0, 6.0)
                fr = np.array(
                    [
                        (zc - dz, 0, cw, 0, 0, 0),
                        (zc - dz / 2, 0, cw, th, ln, 0),
                        (zc + dz / 2, 0, cw, th, ln, 0),
                        (zc + dz, 0, cw, 0, 0, 0),
                    ],
                    float,
                )
                self.calc.append(("falx_calcification", _Blob(fr, False), rng.uniform(150, 450)))
        if "choroid_plexus_calcification" in self.mimics:
            r = rng.uniform(1.5, 3.0)
            fr = _scale_frames(
                [
                    (-3, 18, -33, 0, 0, 0),
                    (0, 18, -33, 1, 1, 0),
                    (5, 18, -32, 1, 1, 0),
                    (8, 18, -32, 0, 0, 0),
                ],
                sa,
                sb,
                su=sa * h.vent_scale**0.35,
                sz=zs,
            )
            fr[:, 3:5] *= np.array([r / sa, r / sb])
            self.calc.append(
                ("choroid_plexus_calcification", _Blob(fr, True), rng.uniform(150, 350))
            )
        if "pineal_calcification" in self.mimics:
            r = rng.uniform(1.5, 3.0)
            fr = _scale_frames(
                [
                    (-10, 0, -22, 0, 0, 0),
                    (-7, 0, -22, 1, 1, 0),
                    (-3, 0, -22, 1, 1, 0),
                    (0, 0, -22, 0, 0, 0),
                ],
                sa,
                sb,
                sz=zs,
            )
            fr[:, 3:5] *= np.array([r / sa, r / sb])
            self.calc.append(("pineal_calcification", _Blob(fr, False), rng.uniform(150, 400)))
        self.sinus_hu = h.hu_sinus
        if "dense_venous_sinus" in self.mimics:
            self.sinus_hu = rng.uniform(62.0, 78.0)
        self.streaks: list[tuple[float, float, float, float, float, float]] = []
        self.streak_z = 0.0
        if "beam_hardening" in self.mimics:
            self.streak_z = rng.uniform(-50.0, -38.0)
            for _ in range(int(rng.integers(3, 8))):
                # a line between the two petrous bones through the posterior fossa
                y1, y2 = rng.uniform(-40, 0, size=2)
                x1 = rng.uniform(30, 45)
                amp = rng.choice([-1.0, -1.0, 1.0]) * rng.uniform(12.0, 40.0)
                self.streaks.append((x1, float(y1), -x1, float(y2), rng.uniform(0.8, 2.5), amp))

    # ---- ellipse painting ---------------------------------------------------------------
    def _paint(self, acc: np.ndarray, blob: _Blob, z: float) -> None:
        """acc = max(acc, slab-averaged coverage of blob), on both sides when mirrored."""
        half = self.h.thickness / 2
        if z + half <= blob.z0 or z - half >= blob.z1:
            return
        for side in (1.0, -1.0) if blob.mirror else (1.0,):
            self._paint_side(acc, blob, z, side)

    def _paint_side(self, acc: np.ndarray, blob: _Blob, z: float, side: float) -> None:
        h = self.h
        T = h.thickness
        samples = [
            p for p in (blob.params(zz) for zz in (z - T / 3, z, z + T / 3)) if p is not None
        ]
        if not samples:
            return
        ct, st = math.cos(h.theta), math.sin(h.theta)
        rp = max(max(p[2], p[3]) for p in samples) / h.px + 3
        r0 = c0 = SIZE
        r1 = c1 = 0
        for p in samples:
            cu, cw = side * p[0], p[1]
            col = (h.cx + cu * ct + cw * st) / h.px + (SIZE - 1) / 2 - self.origin[1]
            row = (h.cy + cu * st - cw * ct) / h.px + (SIZE - 1) / 2 - self.origin[0]
            r0, r1 = min(r0, int(row - rp)), max(r1, int(row + rp) + 1)
            c0, c1 = min(c0, int(col - rp)), max(c1, int(col + rp) + 1)
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(r1, self.shape[0]), min(c1, self.shape[1])
        if r1 <= r0 or c1 <= c0:
            return
        sl = (slice(r0, r1), slice(c0, c1))
        U, W = self.U[sl], self.W[sl]
        tot = np.zeros(U.shape, _F32)
        inv = 1.0 / h.px
        for cu, cw, a, b, ang in samples:
            rad = math.radians(side * ang)
            ca, sa = _F32(math.cos(rad)), _F32(math.sin(rad))
            du, dw = U - _F32(side * cu), W - _F32(cw)
            along = du * ca + dw * sa
            across = dw * ca - du * sa
            n = np.sqrt((along / _F32(a)) ** 2 + (across / _F32(b)) ** 2) + _F32(1e-4)
            g = np.sqrt((along / _F32(a * a)) ** 2 + (across / _F32(b * b)) ** 2)
            g += _F32(1e-4 / min(a, b))
            tot += _ramp((n - 1) * n / g, inv)
        tot *= _F32(1.0 / 3.0)
        np.maximum(acc[sl], tot, out=acc[sl])

    def _blobs(self, blobs: Sequence[_Blob], z: float) -> np.ndarray:
        acc = np.zeros(self.shape, _F32)
        for b in blobs:
            self._paint(acc, b, z)
        return acc

    # ---- one slice --------------------------------------------------------------------------
    def render(
        self, z: float, need: frozenset[str] = frozenset()
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """HU (crop) of the slab centred at z (relative to the widest cranial level), before
        noise and blur, plus the fields named in need for the lesion generator."""
        h = self.h
        T, px = h.thickness, h.px
        hz = h.hz_up if z >= 0 else h.hz_low
        gz = abs(z) / hz**2
        rho = np.sqrt(self.R0sq + _F32((z / hz) ** 2))
        den = np.sqrt(self.R0Gsq + _F32(gz * gz))
        D = (rho - 1) * rho / den  # ~ signed 3D distance to the inner table (mm, < 0 inside)
        sin_t = _F32(gz) / den  # how steeply the cranium closes across the slab
        inv_w = 1.0 / (px + T * 0.9 * sin_t)

        ff = self.f_fine.value(z)
        fslow = self.f_slow.value(z)
        content, fields = self._content(z, D, sin_t, inv_w, ff, fslow, need)

        # skull and scalp, painted from the outside in
        hu = np.full(self.shape, -1000.0, _F32)
        scalp_hu = h.hu_scalp + 6 * fslow
        _lerp_(hu, scalp_hu, _ramp(D - self.L4, inv_w))
        table = h.hu_table + 80 * ff
        dip = h.hu_diploe + 160 * ff
        if z < -30:  # no bone in front of the orbits and the nose
            face = self.face * _F32(np.clip((-32 - z) / 6.0, 0, 1))
            _lerp_(table, scalp_hu, face)
            _lerp_(dip, scalp_hu, face)
        _lerp_(hu, table, _ramp(D - self.L3, inv_w))
        _lerp_(hu, dip, _ramp(D - self.L2, inv_w))
        _lerp_(hu, table, _ramp(D - self.L1, inv_w))
        inside = _ramp(D, inv_w)
        _lerp_(hu, content, inside)
        if need:  # lesions replace the intracranial content, under the skull's partial volume
            fields["inside"] = inside
            fields["content"] = content
        if self.streaks and abs(z - self.streak_z) < 12:
            hu += self._streaks(z) * _ramp(D - self.L3, inv_w)
            self.seen.add("beam_hardening")
        return hu, fields

    def _content(
        self,
        z: float,
        D: np.ndarray,
        sin_t: np.ndarray,
        inv_w: np.ndarray,
        ff: np.ndarray,
        fslow: np.ndarray,
        need: frozenset[str],
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        h = self.h
        T, px = h.thickness, h.px
        inv_px = 1.0 / px
        # brain surface: inside the inner table less the subarachnoid CSF rim, above the floor
        above = np.clip((z + T / 2 - self.F) / T, 0, 1)
        above_b = np.clip((z + T / 2 - self.F - 0.7 * self.rim) / T, 0, 1)
        brain = _ramp(D + self.rim, inv_w) * above_b
        depth = -D - self.rim  # mm under the brain surface

        cb = None  # cerebellum, under the tentorium
        if z < -15:
            cb = self.w_post * np.clip((self.TT - z) / T + 0.5, 0, 1)

        # sulci: zero set of a random field, kept roughly perpendicular to the surface
        fs, fgx, fgy = self.f_sulc.value_grad(z)
        gn = np.sqrt(fgx * fgx + fgy * fgy) + _F32(1e-3)
        dist = np.abs(fs) / gn
        cosang = np.abs(fgx * self.nx + fgy * self.ny) / gn
        gate = np.clip((0.92 - cosang) / 0.35, 0, 1)
        depth_s = 16.0 + 5 * h.atrophy
        taper = np.clip(1 - depth / depth_s, 0, 1)
        w_z = (0.45 + 1.0 * h.atrophy) * (0.6 + 0.8 * float(np.clip((z + 10) / 70, 0, 1)))
        ws = _F32(w_z) * gate * np.sqrt(taper)
        sulc = _ramp(dist - ws, inv_px * 0.7) * (taper > 0) * _F32(0.9)
        ribbon = 2.6
        gm = _ramp(dist - (ws + ribbon) * np.clip(gate * 3, 0, 1), 1.0 / 1.2) * (
            depth < depth_s + 1.5
        )
        floor_d = z - self.F - 0.7 * self.rim
        np.maximum(gm, _ramp(np.minimum(depth, floor_d) - ribbon, 1.0 / 1.2), out=gm)
        if cb is not None:
            sulc *= 1 - cb
            fol = _ramp(np.abs(ff) / 0.45 - 0.35, 1.0) * cb * (depth > 0.5)  # folia
            gm += (0.8 - gm) * cb
            np.maximum(sulc, fol * 0.8, out=sulc)

        # interhemispheric fissure (with the falx) where the hemispheres face each other,
        # computed over the band of columns around the midline only
        m = self.mid
        au, wm = np.abs(self.U[m]), self.W[m]
        if z > 30:
            gate_f = np.ones_like(au)
        else:
            w_a = h.sb * (30 if z > -22 else 6)
            w_p = -h.sb * (42 if z > -22 else 35)
            gate_f = np.clip((wm - w_a) / 3 + 0.5, 0, 1) + np.clip((w_p - wm) / 3 + 0.5, 0, 1)
            if cb is not None:
                gate_f *= 1 - cb[m]
            if z < -30:
                gate_f *= np.clip((wm - 10) / 3, 0, 1)
        wf = 0.6 + 1.6 * h.atrophy
        fis = _ramp(au - wf, inv_px) * gate_f * brain[m]
        falx = _ramp(au - 0.45, inv_px) * gate_f * _ramp(D[m], inv_w[m]) * above[m]

        vent = self._blobs(self.vent, z)
        cist = self._blobs(self.cist, z)
        stem = self._blobs((self.stem,), z)
        deep = self._blobs(self.deep, z)
        cist *= 1 - stem

        csf_free = brain * (1 - sulc) * (1 - vent) * (1 - cist)
        csf_free[m] *= 1 - fis
        paren = np.maximum(csf_free, stem * above)
        np.maximum(gm, deep * (1 - vent) * _F32(0.6), out=gm)
        gm *= 1 - stem
        par_hu = h.hu_wm + (h.hu_gm - h.hu_wm) * gm + 1.8 * fslow + 0.8 * ff
        content = h.hu_csf + (par_hu - h.hu_csf) * paren

        cho = self._blobs((self.choroid,), z)  # normal choroid plexus in the atria
        _lerp_(content, 30.0, cho * vent)

        # falx, tentorium and dural venous sinuses
        _lerp_(content[m], h.hu_falx, falx * 0.6)
        if cb is not None:
            tent = self.w_post * np.exp(-(((z - self.TT) / (0.45 * T)) ** 2)) * (1 - stem)
            _lerp_(content, h.hu_falx, tent * 0.35)
        sinus = self._sinuses(z, D)
        _lerp_(content, self.sinus_hu + 3 * ff, sinus)
        if "dense_venous_sinus" in self.mimics and sinus.max() > 0.5:
            self.seen.add("dense_venous_sinus")
        for name, blob, val in self.calc:
            acc = self._blobs((blob,), z)
            _lerp_(content, val, acc)
            if acc.max() > 0.5:
                self.seen.add(name)

        # skull base: bone, air cells, sinuses, orbits below the cranial floor
        if z - T / 2 < self.Fmax:
            lo = self.F - self.TB
            bone_frac = np.clip(
                (np.minimum(z + T / 2, self.F) - np.maximum(z - T / 2, lo)) / T, 0, 1
            )
            deep_frac = np.clip((lo - (z - T / 2)) / T, 0, 1)
            bone = h.hu_table + (h.hu_petrous - h.hu_table) * self.petrous + 100 * ff
            _lerp_(bone, -850.0, self.cells * _ramp(0.15 - ff, 2.0))  # mastoid air cells
            _lerp_(bone, -900.0, self._blobs(self.air[:1], z))  # sphenoid sinus
            filler = 45.0 + 5 * fslow
            fat = self._blobs((self.orbit_fat,), z)
            _lerp_(filler, -75.0, fat)
            _lerp_(filler, 12.0, self._blobs((self.globe,), z))
            _lerp_(filler, -900.0, self._blobs(self.air, z))
            if -60 < z < -26:  # ethmoid air cells between the orbits
                eth = self.ethmoid * _F32(min(1.0, (z + 60) / 6, (-26 - z) / 6))
                _lerp_(filler, -880.0, eth * _ramp(0.1 - ff, 2.0))
                _lerp_(filler, h.hu_table, eth * _ramp(np.abs(ff - 0.1) - 0.12, 4.0) * 0.7)
            _lerp_(filler, h.hu_table + 100 * ff, self._blobs(self.jaw, z))
            content = content * above + bone * bone_frac + filler * deep_frac

        fields: dict[str, np.ndarray] = {}
        if need:
            supra = above * (1 - cb) if cb is not None else above
            avail = {
                "D": lambda: D,
                "supra": lambda: supra,
                "icv": lambda: _ramp(D, inv_w) * supra,
                "sulc": lambda: sulc * brain * (depth > 0.3),
                "cist": lambda: _with_band(cist * above, m, fis),
                "vent": lambda: vent * above,
                "paren": lambda: paren * above,
            }
            fields = {k: avail[k]() for k in need if k in avail}
        return content, fields

    def _sinuses(self, z: float, D: np.ndarray) -> np.ndarray:
        """Superior sagittal sinus (a triangle at both falx attachments), transverse sinuses
        and torcula along the posterior inner table, straight sinus on the midline."""
        h = self.h
        depth = -D
        out = np.zeros(self.shape, _F32)
        m = self.mid
        au, wm, dm = np.abs(self.U[m]), self.W[m], depth[m]
        if z > -40:
            size = np.where(wm < 0, _F32(7.5), _F32(5.0 if z > -15 else 0.0))
            half = size * 0.55 * np.clip(1 - dm / np.maximum(size, 0.1), 0, 1)
            out[m] = _ramp(au - half, 1.0 / h.px) * (dm > 0) * (dm < size)
        zt = -43.0
        if abs(z - zt) < 12:
            wz = math.exp(-(((z - zt) / 4.5) ** 2))
            band = (
                (depth > 0) * _ramp(depth - 6.0, 1.0 / h.px) * np.clip(-self.sphi * 3 - 0.6, 0, 1)
            )
            np.maximum(out, band * _F32(wz), out=out)
        if -42 < z < -14:
            t = (z + 42) / 28
            cw = h.sb * (-80 + 38 * t)
            d2 = (au / 2.5) ** 2 + ((wm - cw) / 4.0) ** 2
            np.maximum(out[m], _ramp(np.sqrt(d2) - 1, 2.0), out=out[m])
        return out

    def _streaks(self, z: float) -> np.ndarray:
        """Beam-hardening streaks between the petrous bones (dark and bright lines)."""
        h = self.h
        out = np.zeros(self.shape, _F32)
        wz = math.exp(-(((z - self.streak_z) / 5.0) ** 2))
        for x1, y1, x2, y2, width, amp in self.streaks:
            p1 = np.array([x1 * h.sa, y1 * h.sb])
            d = np.array([x2 * h.sa, y2 * h.sb]) - p1
            ln = float(np.hypot(*d))
            du, dw = self.U - _F32(p1[0]), self.W - _F32(p1[1])
            dist = (du * _F32(-d[1]) + dw * _F32(d[0])) / _F32(ln)
            along = (du * _F32(d[0]) + dw * _F32(d[1])) / _F32(ln)
            fade = np.clip(along / 10, 0, 1) * np.clip((ln - along) / 10, 0, 1)
            out += _F32(amp * wz) * np.exp(-((dist / _F32(width)) ** 2)) * fade
        return out


# --------------------------------------------------------------------------------------------
# Haemorrhage
# --------------------------------------------------------------------------------------------


@dataclass
class _Lesion:
    subtype: str
    target_ml: float
    hu: float
    params: dict[str, float]


def _plan_lesions(
    rng: np.random.Generator,
    subtypes: Sequence[str],
    size: str,
    h: _Head,
    extra_axial: str = "classic",
) -> list[_Lesion]:
    lo, hi = _TOTAL_ML[size]
    total = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    shares = rng.dirichlet(np.full(len(subtypes), 1.5)) if len(subtypes) > 1 else np.ones(1)
    vols = [
        min(total * float(share), _CAPACITY_ML[st])
        for st, share in zip(subtypes, shares, strict=True)
    ]
    floor_ml = 0.3 if size == "tiny" else 1.0  # every requested subtype stays visible
    vols = [max(v, floor_ml) for v in vols]
    if size == "tiny" and sum(vols) > 4.6:  # keep tiny strictly under 5 mL
        vols = [v * 4.6 / sum(vols) for v in vols]
    z_lo = h.z_lo + h.thickness
    z_hi = h.z_lo + (h.n - 1) * h.thickness

    def zclamp(zc: float) -> float:
        return float(np.clip(zc, min(z_lo, z_hi), max(z_lo, z_hi)))

    used_sides: list[float] = []
    out = []
    for st, v in zip(subtypes, vols, strict=True):
        p: dict[str, float] = {}
        if st in ("epidural", "subdural"):
            side = float(rng.choice([-1.0, 1.0]))
            if used_sides and used_sides[0] == side:
                side = -side
            used_sides.append(side)
            if st == "epidural":
                r = rng.random()
                if r < 0.7:
                    phi = rng.uniform(-0.6, 0.6)  # temporo-parietal
                    zc = rng.uniform(-25.0, 35.0)
                elif r < 0.85:
                    phi = rng.uniform(0.9, 1.3)  # frontal
                    zc = rng.uniform(-10.0, 35.0)
                else:
                    phi = rng.uniform(-1.35, -0.9)  # occipital
                    zc = rng.uniform(-15.0, 25.0)
                la = (v * 1000 / 0.62) ** (1 / 3) * rng.uniform(0.85, 1.2)
                p.update(la=la, lz=la * rng.uniform(0.55, 0.8), power=0.5)
                if extra_axial == "typical":
                    p.update(pointed=1.0)
            else:
                phi = rng.uniform(-0.7, 0.8)
                zc = rng.uniform(-15.0, 25.0)
                thin = rng.random() < 0.2
                if extra_axial == "typical":  # thin, and spread over much of the convexity
                    t0 = 2.0 * v**0.35 * rng.uniform(0.8, 1.2) * (0.6 if thin else 1.0)
                    t0, la_max, lz_max = max(t0, 1.5), 150.0, 60.0
                else:
                    t0 = 3.0 * v**0.4 * rng.uniform(0.8, 1.2) * (0.5 if thin else 1.0)
                    t0, la_max, lz_max = max(t0, 2.0), 140.0, 45.0
                area = 3 * v * 1000 / (2 * math.pi * t0)
                ratio = rng.uniform(0.45, 0.75)
                la = min(math.sqrt(area / ratio), la_max)
                lz = min(area / la, lz_max)
                p.update(la=la, lz=lz, power=1.0)
            ang = phi if side > 0 else math.pi - phi
            p.update(phi=ang, zc=zclamp(zc))
            hu = rng.uniform(55.0, 80.0) if st == "epidural" else rng.uniform(50.0, 78.0)
        elif st == "intraparenchymal":
            r = rng.random()
            side = float(rng.choice([-1.0, 1.0]))
            sa, sb = h.sa, h.sb
            if r < 0.4:
                cu, cw, zc = side * 24 * sa, 2 * sb, rng.uniform(-12.0, 4.0)  # putamen
            elif r < 0.55:
                cu, cw, zc = side * 10 * sa, -10 * sb, rng.uniform(-10.0, 4.0)  # thalamus
            elif r < 0.9:
                ang = rng.uniform(0, 2 * math.pi)
                rr = rng.uniform(0.35, 0.6)
                cu, cw, zc = (
                    rr * 66 * sa * math.cos(ang),
                    rr * 86 * sb * math.sin(ang),
                    rng.uniform(5.0, 45.0),
                )
            else:
                cu, cw, zc = side * 25 * sa, -58 * sb, rng.uniform(-62.0, -50.0)  # cerebellum
            rad = (3 * v * 1000 / (4 * math.pi)) ** (1 / 3)
            p.update(
                cu=cu,
                cw=cw,
                zc=zclamp(zc),
                rad=rad,
                ex=rng.uniform(0.75, 1.3),
                ey=rng.uniform(0.75, 1.3),
                ez=rng.uniform(0.7, 1.1),
                rim=rng.uniform(0.12, 0.4),
                edema=rng.uniform(14.0, 20.0),
            )
            for k in range(2, 6):
                p[f"h{k}"] = rng.uniform(0.0, 0.09)
                p[f"p{k}"] = rng.uniform(0, 2 * math.pi)
            hu = rng.uniform(55.0, 88.0)
        elif st == "intraventricular":
            hu = rng.uniform(42.0, 70.0)
        else:  # subarachnoid
            mode = rng.random()
            p["basal"] = float(mode < 0.55)
            ang = rng.uniform(0, 2 * math.pi)
            p.update(phi=ang, zc=zclamp(rng.uniform(15.0, 55.0)) if mode >= 0.55 else zclamp(-28.0))
            hu = rng.uniform(45.0, 70.0)
        out.append(_Lesion(st, v, hu, p))
    return out


_NEEDS = {
    "epidural": ("D", "icv", "supra"),
    "subdural": ("D", "icv", "supra"),
    "intraparenchymal": ("icv", "paren"),
    "intraventricular": ("vent",),
    "subarachnoid": ("sulc", "cist"),
}


def _pack(key: str, value: np.ndarray) -> np.ndarray:
    """Keep per-slice lesion fields small: distances and HU as float16, coverage as uint8."""
    if key in ("D", "content"):
        return value.astype(np.float16)
    return np.rint(np.clip(value, 0, 1) * 255).astype(np.uint8)


def _unpack(value: np.ndarray) -> np.ndarray:
    if value.dtype == np.uint8:
        return value.astype(_F32) * _F32(1 / 255)
    return value.astype(_F32)


def _select(lam: np.ndarray, ok: np.ndarray, k: int) -> float:
    """Threshold so that exactly k of the allowed voxels lie below it (or all of them)."""
    vals = lam[ok]
    if vals.size == 0:
        return -np.inf
    if k >= vals.size:
        return float(vals.max()) + 1e-3
    part = np.partition(vals, k)
    return float(part[k - 1] + part[k]) / 2


class _LesionPainter:
    """Turns planned lesions into masks and partial-volume coverage, with exact volumes."""

    def __init__(self, r: _Renderer, fields: list[dict[str, np.ndarray]], zs: np.ndarray) -> None:
        self.r = r
        self.fields = fields
        self.zs = zs
        h = r.h
        self.voxel_ml = h.px * h.px * h.thickness / 1000.0

    def _stack(self, key: str, idx: np.ndarray) -> np.ndarray:
        return np.stack([self._get(i, key) for i in idx])

    def _get(self, i: int, key: str) -> np.ndarray:
        return _unpack(self.fields[i][key])

    def paint(self, les: _Lesion) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(slice indices, mask (n,H,W) bool, coverage (n,H,W), oedema coverage or None)."""
        fn = getattr(self, "_" + les.subtype)
        return fn(les)

    def _k(self, les: _Lesion) -> int:
        return max(1, round(les.target_ml / self.voxel_ml))

    # -- extra-axial: lentiform epidural, crescentic subdural ---------------------------------
    def _epidural(self, les: _Lesion) -> tuple:
        return self._extra_axial(les)

    def _subdural(self, les: _Lesion) -> tuple:
        return self._extra_axial(les)

    def _extra_axial(self, les: _Lesion) -> tuple:
        p = les.params
        r = self.r
        h = r.h
        idx = np.nonzero(np.abs(self.zs - p["zc"]) < p["lz"] + h.thickness)[0]
        if idx.size == 0:
            idx = np.array([int(np.argmin(np.abs(self.zs - p["zc"])))])
        cphi, sphi = math.cos(p["phi"]), math.sin(p["phi"])
        cosd = r.cphi * _F32(cphi) + r.sphi * _F32(sphi)
        chord = np.sqrt(np.clip(2 - 2 * cosd, 0, None))  # 2 sin(dphi/2)
        lam_all, ok_all, f_all = [], [], []
        rmean = (h.a + (h.b_ant + h.b_post) / 2) / 2
        for i in idx.tolist():
            z = float(self.zs[i])
            hz = h.hz_up if z >= 0 else h.hz_low
            scale = math.sqrt(max(1 - (z / hz) ** 2, 0.05))
            st = chord * _F32(rmean * scale)
            u2 = (st / _F32(p["la"])) ** 2 + _F32(((z - p["zc"]) / p["lz"]) ** 2)
            if p.get("pointed"):  # lens tapering to points: a biconvex profile
                f = np.clip(1 - u2, 0, None)
            elif p["power"] < 1:  # lens: an elliptical profile with steep, sharp ends
                f = np.sqrt(np.clip(1 - u2, 0, None))
            else:  # crescent: even thickness along the convexity, tapering at the ends
                f = np.clip(1 - u2 * u2, 0, None)
            depth = -self._get(i, "D")
            ok = (f > 0.02) & (self._get(i, "icv") >= 0.5) & (depth > 0)
            lam = np.where(ok, depth / np.maximum(f, 1e-3), np.inf).astype(_F32)
            lam_all.append(lam)
            ok_all.append(ok)
            f_all.append(f)
        lam = np.stack(lam_all)
        ok = np.stack(ok_all)
        thr = _select(lam, ok, self._k(les))
        mask = ok & (lam < thr)
        f = np.stack(f_all)
        supra = self._stack("supra", idx)
        depth = -self._stack("D", idx)
        cov = np.clip(0.5 + (thr * f - depth) / h.px, 0, 1) * supra * (f > 0.02)
        return idx, mask, cov, None

    # -- intraparenchymal: irregular blob with an oedema rim -------------------------------------
    def _intraparenchymal(self, les: _Lesion) -> tuple:
        p = les.params
        r = self.r
        h = r.h
        rad = p["rad"]
        reach = rad * 1.6 * (1 + p["rim"]) + 4
        idx = np.nonzero(np.abs(self.zs - p["zc"]) < reach * p["ez"] + h.thickness)[0]
        if idx.size == 0:
            idx = np.array([int(np.argmin(np.abs(self.zs - p["zc"])))])
        lam_all, ok_all = [], []
        du = r.U - _F32(p["cu"])
        dw = r.W - _F32(p["cw"])
        ang = np.arctan2(dw, du)
        wob = np.ones_like(du)
        for k in range(2, 6):
            wob += _F32(p[f"h{k}"]) * np.cos(k * ang + _F32(p[f"p{k}"]))
        inplane = (du / _F32(p["ex"])) ** 2 + (dw / _F32(p["ey"])) ** 2
        for i in idx.tolist():
            dz = (float(self.zs[i]) - p["zc"]) / p["ez"]
            q = np.sqrt(inplane + _F32(dz * dz)) / wob
            ok = (self._get(i, "icv") >= 0.5) | (self._get(i, "paren") >= 0.5)
            ok &= q < reach
            lam_all.append(np.where(ok, q, np.inf).astype(_F32))
            ok_all.append(ok)
        lam = np.stack(lam_all)
        ok = np.stack(ok_all)
        thr = _select(lam, ok, self._k(les))
        mask = ok & (lam < thr)
        cov = np.clip(0.5 + (thr - lam) / h.px, 0, 1)
        edema = np.clip(0.5 + (thr * (1 + p["rim"]) + 1.0 - lam) / 1.5, 0, 1) * (1 - cov)
        edema *= self._stack("paren", idx)
        return idx, mask, cov, edema

    # -- intraventricular: dependent layering with a fluid level --------------------------------
    def _intraventricular(self, les: _Lesion) -> tuple:
        r = self.r
        h = r.h
        idx = np.arange(len(self.zs))
        vent = self._stack("vent", idx)
        has = vent.reshape(len(idx), -1).max(1) >= 0.5
        idx = idx[has] if has.any() else idx[:1]
        vent = vent[has] if has.any() else vent[:1]
        y = np.broadcast_to(r.Y, vent.shape)
        ok = vent >= 0.5
        # most posterior (dependent, patient supine) first; a tiny tilt breaks ties along rows
        lam = -y + np.abs(r.U)[None] * _F32(1e-4)
        thr = _select(lam, ok, self._k(les))
        mask = ok & (lam < thr)
        cov = vent * np.clip(0.5 + (thr - lam) / h.px, 0, 1)
        return idx, mask, cov, None

    # -- subarachnoid: sulci near a convexity point, or the basal cisterns ----------------------
    def _subarachnoid(self, les: _Lesion) -> tuple:
        p = les.params
        r = self.r
        h = r.h
        key = "cist" if p["basal"] else "sulc"
        sb = (h.b_ant + h.b_post) / 2 / 86.0
        if p["basal"]:
            cu, cw, sx = 0.0, 6 * sb, 2.2  # spreads laterally into the Sylvian fissures
        else:
            rr = 0.8
            cu = rr * h.a * math.cos(p["phi"])
            cw = rr * (h.b_ant + h.b_post) / 2 * math.sin(p["phi"])
            sx = 1.0
        idx = np.arange(len(self.zs))
        dist_xy = (((r.U - _F32(cu)) / _F32(sx)) ** 2 + (r.W - _F32(cw)) ** 2).astype(_F32)
        csf = self._stack(key, idx)
        lam = np.sqrt(
            dist_xy[None] + ((self.zs[idx] - p["zc"]) ** 2).astype(_F32)[:, None, None] * 1.5
        )
        ok = csf >= 0.5
        thr = _select(lam, ok, self._k(les))
        mask = ok & (lam < thr)
        cov = csf * np.clip(0.5 + (thr - lam) / 2.0, 0, 1)
        keep = mask.reshape(len(idx), -1).any(1) | (cov.reshape(len(idx), -1).max(1) > 0.05)
        return idx[keep], mask[keep], cov[keep], None


# --------------------------------------------------------------------------------------------
# Study generation
# --------------------------------------------------------------------------------------------


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, stream])


def _blur_noise(img: np.ndarray, beta: float, noise: np.ndarray) -> np.ndarray:
    """Add white noise then a separable [b/4, 1-b/2, b/4] blur: partial volume plus the
    correlated grain of a reconstruction kernel."""
    img += noise
    c, e = _F32(1 - beta / 2), _F32(beta / 4)
    out = img.copy()
    out[:, 1:-1] = c * img[:, 1:-1] + e * (img[:, :-2] + img[:, 2:])
    img2 = out.copy()
    img2[1:-1] = c * out[1:-1] + e * (out[:-2] + out[2:])
    return img2


EXTRA_AXIAL_SHAPES = ("classic", "typical")


def _check_size_range(min_size: str, max_size: str) -> None:
    _check_size(min_size)
    _check_size(max_size)
    if SIZES.index(min_size) > SIZES.index(max_size):
        raise ValueError(f"the smallest size {min_size!r} is larger than the largest {max_size!r}")


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")


def _check_extra_axial(extra_axial: str) -> None:
    if extra_axial not in EXTRA_AXIAL_SHAPES:
        raise ValueError(
            f"unknown extra-axial shapes {extra_axial!r}; expected one of {EXTRA_AXIAL_SHAPES}"
        )


def _check_favour(favour: Sequence[str]) -> None:
    unknown = [s for s in favour if s not in SUBTYPES]
    if unknown:
        raise ValueError(f"unknown subtype {unknown[0]!r} to favour; expected one of {SUBTYPES}")


def draw_subtypes(choice: np.random.Generator, favour: Sequence[str] = ()) -> list[str]:
    """A random study's subtypes: none about 40 % of the time, else one to three, each subtype
    in favour drawn with three times the weight of the others (about 1.5 times as many
    studies hold it)."""
    _check_favour(favour)
    if choice.random() < 0.4:
        return []
    n = int(choice.choice([1, 1, 1, 2, 2, 3]))
    if favour:
        w = np.array([3.0 if s in favour else 1.0 for s in SUBTYPES])
        drawn = choice.choice(SUBTYPES, size=n, replace=False, p=w / w.sum())
    else:  # no p: the same draws as before favour existed, so old seeds give the same studies
        drawn = choice.choice(SUBTYPES, size=n, replace=False)
    return [str(s) for s in drawn]


def generate_study(
    seed: int,
    *,
    subtypes: Sequence[str] | None = None,
    size: str | None = None,
    n_slices: int | None = None,
    mimics: bool | None = None,
    slice_thickness_mm: float | None = None,
    favour: Sequence[str] = (),
    extra_axial: str = "classic",
    min_size: str = "tiny",
    max_size: str = "large",
) -> PhantomStudy:
    """One synthetic head CT, deterministic in its arguments.

    subtypes: None draws at random (about 40 % negative, else one to three subtypes); [] is a
    negative study. size: "tiny" (under 5 mL in all), "small", "medium", "large" (roughly
    45-100 mL) or None (random). n_slices: default covers the head (about 32-38 slices at
    5 mm). mimics: None at random (half the studies, independent of the label), True at least
    one, False none. slice_thickness_mm: 5.0 by default, 2.5-5 allowed. favour: subtypes that a
    random study draws more often, as in draw_subtypes (for a training set that dwells on a hard
    distinction, such as subdural against epidural). extra_axial: "classic", the shapes every
    set of the shipped model was made with (epidurals elliptical lenses about 4 times as long
    as thick, subdurals even bands about 6-10 times), or "typical" (epidurals lenses that taper
    to points, subdurals thinner and longer, about 15-20 times): docs/model-analysis.md
    measures how much better the typical shapes tell the two apart. min_size: a random size
    drawn smaller becomes this one, every other draw unchanged; max_size: likewise a larger draw.
    """
    seed = int(seed)
    _check_extra_axial(extra_axial)
    given = {
        "subtypes": None if subtypes is None else ",".join(subtypes),
        "size": size,
        "n_slices": n_slices,
        "mimics": mimics,
        "slice_thickness_mm": slice_thickness_mm,
        "favour": ",".join(favour) or None,
        "extra_axial": None if extra_axial == "classic" else extra_axial,
        "min_size": None if min_size == "tiny" else min_size,
        "max_size": None if max_size == "large" else max_size,
    }
    variant = ";".join(f"{k}={v}" for k, v in given.items() if v is not None)
    choice = _rng(seed, 0)
    if subtypes is None:
        chosen = draw_subtypes(choice, favour)
    else:
        chosen = list(dict.fromkeys(subtypes))
        for s in chosen:
            if s not in SUBTYPES:
                raise ValueError(f"unknown subtype {s!r}; expected one of {SUBTYPES}")
    size_draw = str(choice.choice(SIZES, p=_SIZE_P))
    _check_size_range(min_size, max_size)
    size_draw = SIZES[max(SIZES.index(size_draw), SIZES.index(min_size))]
    size_draw = SIZES[min(SIZES.index(size_draw), SIZES.index(max_size))]
    if size is not None:
        _check_size(size)
    size_used = (size or size_draw) if chosen else None
    thickness = float(slice_thickness_mm or 5.0)
    if not 2.5 <= thickness <= 5.0:
        raise ValueError("slice_thickness_mm must be between 2.5 and 5")
    if n_slices is not None and n_slices < 1:
        raise ValueError("n_slices must be positive")

    head = _sample_head(_rng(seed, 1), thickness, n_slices)
    mrng = _rng(seed, 4)
    if mimics is False:
        mimic_list: list[str] = []
    else:
        n_m = int(mrng.choice([1, 1, 2, 3])) if mimics else int(mrng.choice([0, 0, 0, 1, 1, 2]))
        mimic_list = sorted(str(m) for m in mrng.choice(MIMICS, size=n_m, replace=False))
    rend = _Renderer(head, mimic_list, mrng)
    lesions = (
        _plan_lesions(_rng(seed, 2), chosen, size_used, head, extra_axial) if size_used else []
    )
    need = frozenset(k for les in lesions for k in _NEEDS[les.subtype])
    if need:
        need |= {"inside", "content"}

    zs = head.z_lo + (np.arange(head.n) + 0.5) * thickness
    for random_field in (rend.f_fine, rend.f_slow, rend.f_sulc):
        random_field.schedule(zs.tolist())
    clean: list[np.ndarray] = []
    fields: list[dict[str, np.ndarray]] = []
    for z in zs.tolist():
        img, fld = rend.render(z, need)
        clean.append(img)
        fields.append({k: _pack(k, v) for k, v in fld.items()})

    masks = np.zeros((head.n, SIZE, SIZE), np.uint8)
    crop_masks = masks[:, rend.rows, rend.cols]
    if lesions:
        painter = _LesionPainter(rend, fields, zs)
        tex = _Field(head.seeds[2] ^ 0xB100D, head.px, 1.6, 3.0, rend.rows, rend.cols)
        for les in lesions:
            idx, mask, cov, edema = painter.paint(les)
            for j, i in enumerate(idx.tolist()):
                inside, content = _unpack(fields[i]["inside"]), _unpack(fields[i]["content"])
                if edema is not None:
                    delta = edema[j] * (_F32(les.params["edema"]) - content)
                    content += delta
                    clean[i] += inside * delta
                blood = les.hu + 4.0 * tex.value(float(zs[i]))
                delta = cov[j] * (blood - content)
                content += delta
                clean[i] += inside * delta
                fields[i]["content"] = _pack("content", content)
                crop_masks[i][mask[j]] |= _BIT[les.subtype]
    del fields

    nrng = _rng(seed, 3)
    beta = head.blur
    k1 = 2 * (beta / 4) ** 2 + (1 - beta / 2) ** 2  # noise std kept after the blur
    sigma_white = head.noise_sigma / k1
    c = (np.arange(SIZE) - (SIZE - 1) / 2) * head.px
    rr2 = c[:, None] ** 2 + c[None, :] ** 2
    outside = rr2 > ((SIZE / 2) * head.px) ** 2
    hu = np.empty((head.n, SIZE, SIZE), np.int16)
    for i, z in enumerate(zs.tolist()):
        sig = sigma_white * (1 + 0.35 * float(np.clip((-40 - z) / 40, 0, 1)))
        noise = nrng.standard_normal((SIZE, SIZE), dtype=_F32) * _F32(sig)
        full = np.full((SIZE, SIZE), -1000.0, _F32)
        full[rend.rows, rend.cols] = clean[i]
        img = _blur_noise(full, beta, noise)
        np.clip(img, AIR_HU, 3071, out=img)
        np.copyto(img, _F32(PADDING_HU if head.padded else AIR_HU), where=outside)
        hu[i] = np.rint(img)
        clean[i] = None  # type: ignore[call-overload]

    slice_labels, labels, volumes = _labels_from_masks(masks, head.px, thickness)
    return PhantomStudy(
        study_id=f"phantom-{seed:05d}",
        hu=hu,
        masks=masks,
        slice_labels=slice_labels,
        labels=labels,
        volumes_ml=volumes,
        pixel_spacing_mm=head.px,
        slice_thickness_mm=thickness,
        positions_mm=np.round(head.table_z + (zs - zs[0]), 3),
        mimics=[m for m in mimic_list if m in rend.seen],
        seed=seed,
        size=size_used if labels["any"] else None,
        padded=head.padded,
        noise_sigma_hu=round(float(head.noise_sigma), 2),
        variant=variant,
    )


def _labels_from_masks(
    masks: np.ndarray, px: float, thickness: float
) -> tuple[np.ndarray, dict[str, int], dict[str, float]]:
    n = masks.shape[0]
    sl = np.zeros((n, len(CLASSES)), np.uint8)
    volumes: dict[str, float] = {}
    for j, st in enumerate(SUBTYPES):
        bit = (masks & _BIT[st]) > 0
        counts = bit.reshape(n, -1).sum(1)
        sl[:, j + 1] = counts >= MIN_PIXELS
        volumes[st] = round(float(counts.sum()) * px * px * thickness / 1000.0, 3)
    sl[:, 0] = sl[:, 1:].max(1) if n else 0
    labels = {name: int(sl[:, j].max()) if n else 0 for j, name in enumerate(CLASSES)}
    return sl, labels, volumes


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def write_study(
    study: PhantomStudy,
    out_dir: Path,
    *,
    patient_name: str = "PHANTOM^HEAD",
    patient_id: str | None = None,
    shuffle_names: bool = False,
) -> list[Path]:
    """Write one CT Image Storage file per slice (Explicit VR Little Endian) into out_dir.

    Returns the paths in slice order (index 0 = most inferior). With shuffle_names the file
    names IM0001.dcm... are handed out in a scrambled (deterministic) order, as some archives
    do, so readers must sort by position. UIDs derive from the study id and the options that made
    it (``variant``): reruns give the same, and one id drawn two ways does not share them.
    """
    from pydicom.dataset import Dataset as _Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sid = study.study_id
    key = _stable_int(sid, "meta")
    n = study.n_slices
    study_uid = generate_uid(entropy_srcs=[*_uid_key(study), "study"])
    series_uid = generate_uid(entropy_srcs=[*_uid_key(study), "series"])
    frame_uid = generate_uid(entropy_srcs=[*_uid_key(study), "frame"])
    uids = sop_instance_uids(study)
    date = _dt.date(2024, 1, 1) + _dt.timedelta(days=key % 700)
    secs = 7 * 3600 + (key >> 12) % (15 * 3600)
    tm = f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}"
    order = np.arange(n)
    if shuffle_names:
        order = np.random.default_rng(key & 0xFFFFFFFF).permutation(n)
    px = study.pixel_spacing_mm
    x0 = -(SIZE - 1) / 2 * px
    padded = study.padded
    pid = patient_id or f"PH{sid.rsplit('-', 1)[-1]}"
    paths: list[Path] = []
    age_years = 20 + key % 70
    # Every slice's file holds the same elements; only the instance, its position and its
    # pixels change from one to the next, so one dataset is filled once and updated per slice.
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "ICHTRIAGE_PH1"
    ds = _Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = tm
    ds.AccessionNumber = f"PHA{key % 10**9:09d}"
    ds.Modality = "CT"
    ds.Manufacturer = "ICH-TRIAGE PHANTOM"
    ds.ManufacturerModelName = "Synthetic head CT"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = f"AXIAL BRAIN {study.slice_thickness_mm:g}mm"
    ds.PatientName = patient_name
    ds.PatientID = pid
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientAge = f"{age_years:03d}Y"
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = f"{study.slice_thickness_mm:g}"
    ds.SpacingBetweenSlices = f"{study.slice_thickness_mm:g}"
    ds.KVP = "120"
    ds.ConvolutionKernel = "H30s"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{key % 100000}"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = SIZE
    ds.Columns = SIZE
    ds.PixelSpacing = [f"{px:.4f}", f"{px:.4f}"]
    ds.BitsAllocated = 16
    if padded:
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.add_new(0x00280120, "SS", PADDING_HU + 1024)  # PixelPaddingValue
    else:
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    for i in range(n):
        meta.MediaStorageSOPInstanceUID = UID(uids[i])
        ds.SOPInstanceUID = uids[i]
        ds.InstanceNumber = i + 1
        z = float(study.positions_mm[i])
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{x0:.4f}", f"{z:.3f}"]
        ds.SliceLocation = f"{z:.3f}"
        stored = study.hu[i].astype(np.int32) + 1024
        pixels = stored.astype(np.int16) if padded else np.clip(stored, 0, 4095).astype(np.uint16)
        ds.PixelData = pixels.tobytes()
        path = out_dir / f"IM{int(order[i]) + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sop_instance_uids(study: PhantomStudy) -> list[str]:
    """The SOP Instance UIDs write_study gives each slice (deterministic from the study id)."""
    from pydicom.uid import generate_uid

    return [
        str(generate_uid(entropy_srcs=[*_uid_key(study), "sop", str(i)]))
        for i in range(study.n_slices)
    ]


def _uid_key(study: PhantomStudy) -> list[str]:
    """What a study's UIDs derive from: its id, and the options that changed its pixels (a
    default study keeps the UIDs it always had)."""
    return [study.study_id, study.variant] if study.variant else [study.study_id]


def _write_one(
    seed: int,
    *,
    out: Path,
    favour: Sequence[str],
    extra_axial: str,
    min_size: str,
    max_size: str = "large",
) -> tuple[PhantomSummary, list, list[list]]:
    """Generates and writes one study of ``write_dataset``: its summary, labels.csv row and
    slice_labels.csv rows."""
    study = generate_study(
        seed, favour=favour, extra_axial=extra_axial, min_size=min_size, max_size=max_size
    )
    sdir = out / study.study_id
    write_study(study, sdir)
    uids = sop_instance_uids(study)
    np.savez_compressed(
        sdir / "masks.npz",
        masks=study.masks,
        sop_instance_uids=np.array(uids),
        positions_mm=study.positions_mm,
    )
    summary = PhantomSummary(
        study_id=study.study_id,
        directory=sdir,
        labels=dict(study.labels),
        volumes_ml=dict(study.volumes_ml),
        n_slices=study.n_slices,
        mimics=list(study.mimics),
        size=study.size,
        sop_instance_uids=uids,
    )
    row = [study.study_id, *(study.labels[c] for c in CLASSES)]
    slice_rows = [
        [study.study_id, uid, j, *study.slice_labels[j].tolist()] for j, uid in enumerate(uids)
    ]
    return summary, row, slice_rows


def write_dataset(
    out: Path,
    n_studies: int,
    seed: int,
    *,
    progress: bool = True,
    favour: Sequence[str] = (),
    extra_axial: str = "classic",
    min_size: str = "tiny",
    max_size: str = "large",
    workers: int = 1,
) -> list[PhantomSummary]:
    """Write n_studies random studies under out/<study_id>/ with masks.npz, plus
    out/labels.csv and out/slice_labels.csv. Study i uses seed seed * 100000 + i; favour and
    extra_axial as in generate_study, and min_size ("tiny", the default, keeps every draw;
    "small" leaves out bleeds under 5 mL, for a run too small to learn them), and max_size
    ("large", the default, keeps every draw; "small" makes every bleed small or tiny, for a
    reader that must learn small bleeds). ``workers`` > 1
    generates that many studies at once in separate processes: the same files, in the same
    order in the CSVs."""
    _check_size_range(min_size, max_size)
    _check_favour(favour)
    _check_extra_axial(extra_axial)
    if workers < 1:
        raise ValueError(f"workers is at least 1, not {workers}")
    if not 1 <= n_studies <= 100000:
        raise ValueError(f"studies is 1 to 100000, not {n_studies}")
    if seed < 0:
        raise ValueError(f"seed is 0 or more, not {seed}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(seed) * 100000 + i for i in range(n_studies)]
    one = partial(
        _write_one,
        out=out,
        favour=tuple(favour),
        extra_axial=extra_axial,
        min_size=min_size,
        max_size=max_size,
    )
    summaries: list[PhantomSummary] = []
    t0 = time.monotonic()
    with ExitStack() as stack:
        lf = stack.enter_context(open(out / "labels.csv", "w", newline=""))
        sf = stack.enter_context(open(out / "slice_labels.csv", "w", newline=""))
        lw, sw = csv.writer(lf), csv.writer(sf)
        lw.writerow(["study", *CLASSES])
        sw.writerow(["study", "sop_instance_uid", "slice_index", *CLASSES])
        workers = min(workers, max(n_studies, 1))
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

            def close(error_type: object, *_: object) -> bool:
                # after a failure, the studies not yet started are not generated for nothing
                pool.shutdown(wait=True, cancel_futures=error_type is not None)
                return False

            stack.push(close)
            done_studies = pool.map(one, seeds)
        else:
            done_studies = map(one, seeds)
        for done, (summary, row, slice_rows) in enumerate(done_studies, start=1):
            lw.writerow(row)
            sw.writerows(slice_rows)
            summaries.append(summary)
            if progress:
                eta = (time.monotonic() - t0) / done * (n_studies - done)
                print(f"phantom {done}/{n_studies} ETA {eta:.0f}s", file=sys.stderr, flush=True)
    return summaries
