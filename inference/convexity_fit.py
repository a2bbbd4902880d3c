"""`ich convexity`: train the strip network (inference/convexity.py) on studies with blood masks,
then join its evidence to a model package's ensemble by a logistic regression per class, fitted
on other studies that neither network trained on."""

import copy
import inspect
import math
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from inference import datasets, dicom_io
from inference.constants import CLASSES
from inference.convexity import (
    EXTRA_AXIAL,
    ConvexityNet,
    ConvexityReader,
    StripConfig,
    check_classes,
    convexity_strips,
    either_logits,
    evidence_classes,
    neighbours,
    readers_study_logits,
    strip_channels,
    strip_features,
)
from inference.data import _masks_in_series_order
from inference.feature_cache import FeatureCache
from inference.metrics import roc_auc, threshold_for_sensitivity
from inference.package import READER_SLOTS as SLOTS
from inference.package import ModelPackage
from inference.predictor import Predictor
from inference.progress import progress
from inference.training import operating_point_record

SECTOR = 8  # rays per output sector of ConvexityNet (three poolings by 2)


@dataclass
class StripStore:
    """Every training slice's strip, with its neighbours' indices and sector labels."""

    strips: torch.Tensor  # (M, D, A) int16 HU
    below: torch.Tensor  # (M,) index of the neighbour below
    above: torch.Tensor  # (M,)
    sectors: torch.Tensor  # (M, C, A / SECTOR) float32: blood of each read class in the sector

    def __len__(self) -> int:
        return len(self.strips)


def _study_strips(
    job: tuple[datasets.StudyItem, StripConfig, tuple[str, ...]],
) -> tuple[np.ndarray, np.ndarray]:
    item, cfg, classes = job
    series = dicom_io.load_series(item.paths)
    if item.masks_path is None:
        raise ValueError(f"{item.study_id}: the strip network trains on studies with masks.npz")
    masks = _masks_in_series_order(item.masks_path, series.sop_instance_uids)
    if masks is None:
        raise ValueError(f"{item.study_id}: masks.npz does not match the series")
    strips = convexity_strips(series.hu, series.pixel_spacing_mm, cfg, masks=masks, classes=classes)
    labels = strips.labels if strips.labels is not None else np.zeros((0,), np.uint8)
    return np.clip(strips.hu, -1000, 3000).astype(np.int16), labels


def strip_store(
    items: Sequence[datasets.StudyItem],
    cfg: StripConfig,
    *,
    workers: int = 1,
    classes: tuple[str, ...] = EXTRA_AXIAL,
) -> StripStore:
    bar = progress(desc="unroll studies", unit="study", total=len(items))
    strips, labels, below, above = [], [], [], []
    offset = 0
    # spawn: a forked child of a process whose torch thread pool already ran can hang
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [(i, cfg, classes) for i in items]
        for hu, lab in pool.map(_study_strips, jobs, chunksize=2):
            b, a = neighbours(len(hu), offset)
            strips.append(torch.from_numpy(hu))
            labels.append(torch.from_numpy(lab).float())
            below.append(torch.from_numpy(b))
            above.append(torch.from_numpy(a))
            offset += len(hu)
            bar.update()
    bar.close()
    sectors = F.max_pool1d(torch.cat(labels), SECTOR)  # (M, C, A / SECTOR)
    return StripStore(torch.cat(strips), torch.cat(below), torch.cat(above), sectors)


def _turned(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple:
    """Augmentation: the head turned by whole sectors, and mirrored left to right."""
    sectors = int(rng.integers(0, y.shape[-1]))
    x, y = torch.roll(x, sectors * SECTOR, dims=-1), torch.roll(y, sectors, dims=-1)
    if rng.random() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x, y


def train_net(
    store: StripStore,
    *,
    epochs: int = 6,
    steps: int = 150,
    batch: int = 32,
    lr: float = 2e-3,
    width: int = 16,
    seed: int = 0,
    classes: tuple[str, ...] = EXTRA_AXIAL,
) -> tuple[ConvexityNet, list[float]]:
    """Half of each batch are slices with blood of a read class in the strip; the loss reads
    every sector and each slice's strongest sector. One-cycle learning rate; the last epoch's
    net is kept."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = ConvexityNet(width=width, classes=classes)
    if store.sectors.shape[1] != len(net.classes):
        raise ValueError(f"the strips were labelled for {store.sectors.shape[1]} classes")
    positive = (store.sectors.amax(dim=(1, 2)) > 0).numpy()
    if not positive.any() or positive.all():
        raise ValueError(
            f"the strip network needs slices with and without {' or '.join(net.classes)} blood"
        )
    p = np.where(positive, 0.5 / positive.sum(), 0.5 / (~positive).sum())
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=epochs * steps)
    losses = []
    bar = progress(desc="train strip network", unit="step", total=epochs * steps)
    net.train()
    for _ in range(epochs):
        total = 0.0
        for _ in range(steps):
            index = torch.from_numpy(rng.choice(len(store), batch, p=p))
            x = strip_channels(store.strips, index, store.below, store.above)  # (B, 4, D, A)
            x, y = _turned(x, store.sectors[index], rng)
            sector_logits = net(x)  # (B, C, A / SECTOR)
            loss = F.binary_cross_entropy_with_logits(sector_logits, y)
            loss = loss + F.binary_cross_entropy_with_logits(
                net.slice_logits(sector_logits), y.amax(dim=2)
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach())
            bar.update()
        losses.append(total / steps)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    return net.eval(), losses


TRAIN_DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(train_net).parameters.items()
    if k in ("epochs", "steps", "batch", "lr", "width")
}


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """(w_ensemble, w_strips, [w of further features...], bias) minimising log-loss on (S, F)
    features, F >= 2: the ensemble's logit starts at weight 1, the others at 0."""
    features = torch.tensor(x, dtype=torch.float64)
    target = torch.tensor(y, dtype=torch.float64)
    start = torch.zeros(x.shape[1] + 1, dtype=torch.float64)
    start[0] = 1.0
    w = start.requires_grad_(True)
    optimiser = torch.optim.LBFGS([w], lr=0.5, max_iter=200)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = features @ w[:-1] + w[-1]
        loss = F.binary_cross_entropy_with_logits(logits, target) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return w.detach().numpy()


# Floors a fusion may put under the ensemble's logit (`ich convexity --floor`).
FLOORS = (-6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0)


def floored(x: np.ndarray, floor: float) -> np.ndarray:
    """(S, F) fusion features with the ensemble's logit (column 0) raised to ``floor``."""
    out = np.array(x, dtype=np.float64)
    out[:, 0] = np.maximum(out[:, 0], floor)
    return out


def fit_floored_logistic(
    x: np.ndarray, y: np.ndarray, floors: Sequence[float] | None = None
) -> tuple[np.ndarray, float]:
    """The fusion weights (as `_fit_logistic`) and the floor under the ensemble's logit, of
    none (-inf) and ``floors`` (None: FLOORS), whose fit has the lowest log-loss on (x, y)."""
    best_loss, best_w, best_floor = math.inf, np.empty(0), -math.inf
    for floor in (-math.inf, *(FLOORS if floors is None else floors)):
        xf = floored(x, floor)
        w = _fit_logistic(xf, y)
        logits = torch.from_numpy(xf @ w[:-1] + w[-1])
        loss = float(F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y * 1.0)))
        if loss < best_loss - 1e-9:
            best_loss, best_w, best_floor = loss, w, floor
    return best_w, best_floor


def fit_either(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """An "either" fusion of (S, 2) features (the ensemble's logit, the strips' evidence):
    (w_e, b_e, w_s, b_s, a, b) such that ``either_logits`` is
    a * max(w_e * ensemble + b_e, w_s * evidence + b_s) + b. Each inner pair is a logistic
    regression of y on that one score; (a, b) recalibrates their maximum."""
    w_e, b_e = _fit_logistic(x[:, :1], y)
    w_s, b_s = _fit_logistic(x[:, 1:2], y)
    inner = np.maximum(w_e * x[:, 0] + b_e, w_s * x[:, 1] + b_s)
    a, b = _fit_logistic(inner[:, None], y)
    return np.array([w_e, b_e, w_s, b_s, a, b])


# A fusion is kept only where it ranks the fit studies better than the ensemble out of fold.
# (A test of what splitting a reader keeps turns this off, so that its tiny network's fusions,
# which rank six studies no better, are there to compare.)
KEEP_ONLY_BETTER = True


def _folds(count: int, k: int, seed: int, groups: Sequence[str] | None = None) -> np.ndarray:
    """Fold of each of ``count`` studies; with ``groups`` (a patient per study) one patient's
    studies share a fold. Patients are dealt in order of first appearance, so where every
    study is its own patient the folds are those of the plain permutation."""
    if groups is None:
        return np.random.default_rng(seed).permutation(count) % k
    order: dict[str, int] = {}
    index = np.array([order.setdefault(g, len(order)) for g in groups])
    return (np.random.default_rng(seed).permutation(len(order)) % k)[index]


def fit_fusion(
    ensemble: np.ndarray,
    strips: np.ndarray,
    labels: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    classes: tuple[str, ...] = EXTRA_AXIAL,
    fuse: tuple[str, ...] | None = None,
    patients: Sequence[str] | None = None,
    own: np.ndarray | None = None,
    floor: bool = False,
    either: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Per class that reads strip evidence: the fusion fitted on every study, and, out of fold,
    whether it ranks the studies better than the ensemble alone; only then is it kept.

    ``own`` (S, 6): the ensemble's own calibrated logits before any reader joined. Given, each
    fused class also reads the other five classes' (a cross-class fusion): their weights are in
    the record, per kept class, as "cross_weights".

    ``floor``: each fused class's ensemble logit enters as max(logit, floor), the floor (of
    none and FLOORS) fitted with the weights, inside each training fold when out of fold; it is
    in the record, per kept class, as "floor" (null: none).

    ``either``: each class is fused in the "either" form (`fit_either`) instead; its six
    numbers are in the record, per kept class, as "either", and its row of the returned fusion
    stays NaN (`ConvexityReader.either` holds them).

    ensemble (S, 6) calibrated logits, strips (S, C) study strip logits of ``classes`` (NaN
    where no slice was readable), labels (S, 6). Returns the fusion (6, 3) (NaN rows: not
    fused), the out-of-fold study logits (S, 6) of what was kept, and the record. ``fuse``
    limits the classes that may be fused (None: every class with strip evidence); ``patients``
    (one per study) keeps a patient's studies in one fold."""
    if not np.isfinite(ensemble).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(ensemble))[:, 0]})
        raise ValueError(f"the ensemble's logits are not finite for fit studies {bad[:10]}")
    if np.isinf(strips).any():
        bad = sorted({int(i) for i in np.argwhere(np.isinf(strips))[:, 0]})
        raise ValueError(f"the strip logits are infinite for fit studies {bad[:10]}")
    if either and (own is not None or floor):
        raise ValueError("an either fusion reads the two readers only: no --cross or --floor")
    evidence = strip_features(np.nan_to_num(strips, nan=0.0), classes)  # (S, 6)
    readable = ~np.isnan(strips).any(axis=1)
    assignment = _folds(len(labels), folds, seed, patients)
    fusion = np.full((len(CLASSES), 3), np.nan)
    out_of_fold = ensemble.copy()
    record: dict[str, Any] = {}
    for c, name in enumerate(CLASSES):
        if np.isnan(evidence[:, c]).all() or (fuse is not None and name not in fuse):
            continue
        known = ~np.isnan(labels[:, c]) & readable
        y = labels[:, c]
        if len(np.unique(y[known])) < 2:
            continue
        others = [j for j in range(len(CLASSES)) if j != c]
        columns = [ensemble[:, c], evidence[:, c]]
        if own is not None:
            columns += [own[:, j] for j in others]
        x = np.stack(columns, axis=1)
        oof = ensemble[:, c].copy()
        floors = None if floor else ()
        for k in range(folds):
            train, test = known & (assignment != k), known & (assignment == k)
            if either:
                oof[test] = either_logits(x[test], fit_either(x[train], y[train]))
            else:
                w, f = fit_floored_logistic(x[train], y[train], floors)
                oof[test] = floored(x[test], f) @ w[:-1] + w[-1]
        before = roc_auc(y[known], ensemble[known, c])
        after = roc_auc(y[known], oof[known])
        record[name] = {"ensemble_auc": before, "fused_auc_out_of_fold": after}
        if not (after > before or not KEEP_ONLY_BETTER):
            continue
        out_of_fold[:, c] = oof
        if either:
            record[name]["either"] = [float(v) for v in fit_either(x[known], y[known])]
        else:
            w, f = fit_floored_logistic(x[known], y[known], floors)
            fusion[c] = (w[0], w[1], w[-1])
            record[name]["weights"] = [float(v) for v in fusion[c]]
            if floor:
                record[name]["floor"] = None if math.isinf(f) else f
            if own is not None:
                record[name]["cross_weights"] = {
                    CLASSES[j]: float(v) for j, v in zip(others, w[2:-1], strict=True)
                }
    return fusion, out_of_fold, record


def fit_inputs(
    predictor: Predictor,
    reader: ConvexityReader,
    items: Sequence[datasets.StudyItem],
    earlier: Sequence[ConvexityReader] = (),
    cache: FeatureCache | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The scores the new reader's evidence joins (S, 6: the ensemble's calibrated logits, fused
    by the ``earlier`` readers, those whose evidence joins before it), its strip study logits
    (S, C; NaN when unreadable), labels (S, 6) of the studies the fusion is fitted on, and the
    ensemble's own calibrated logits before any reader joined (S, 6)."""
    ensemble, strips, own = [], [], []
    for item in progress(items, desc="score fit studies", unit="study"):
        series = dicom_io.load_series(item.paths)
        base = predictor.ensemble_logits(series, cache=cache)
        own.append(base.copy())
        *read, study = readers_study_logits([*earlier, reader], series.hu, series.pixel_spacing_mm)
        for r, logits in zip(earlier, read, strict=True):
            base = r.fuse(base, logits, own[-1])
        ensemble.append(base)
        strips.append(np.full(len(reader.net.classes), np.nan) if study is None else study)
    labels = np.stack([np.asarray(i.labels, np.float64) for i in items])
    return np.stack(ensemble), np.stack(strips), labels, np.stack(own)


@dataclass
class NetSource:
    """A trained strip network taken from a reader of another package (`--net-from`)."""

    reader: ConvexityReader
    record: dict[str, Any]  # that package's training record of the reader
    name: str  # "PACKAGE VERSION, SLOT reader"
    train_keys: set[str]  # the studies it trained on (datasets.pseudonym of their item_key)


def check_slot(
    package: ModelPackage,
    slot: str,
    fuse: Sequence[str] | None,
    classes: Sequence[str] = EXTRA_AXIAL,
) -> None:
    """Refuses, before any work, a reader that cannot join ``package`` as asked. A reader may
    fuse only classes that no other reader of the package fuses, so replacing one moves no
    class of the other, and the order the readers join in moves no score."""
    if slot not in SLOTS:
        raise ValueError(f"a strip reader goes in {' or '.join(SLOTS)}, not {slot!r}")
    if fuse is not None:
        unknown = sorted(set(fuse) - set(CLASSES))
        if unknown or not fuse:
            raise ValueError(f"--fuse names classes of {', '.join(CLASSES)}; got {tuple(fuse)}")
        unread = sorted(set(fuse) - evidence_classes(classes))
        if unread:
            raise ValueError(
                f"--fuse {', '.join(unread)}: the strip network reads {', '.join(classes)}"
                f" (and so any), not {', '.join(unread)}"
            )
    name = f"{package.name} {package.version}"
    if slot != SLOTS[0]:
        if package.convexity is None:
            raise ValueError(f"{name} has no convexity reader: add one before a {slot} reader")
        if fuse is None:
            raise ValueError(f"a {slot} reader fuses only the classes it is given (--fuse)")
    may = set(fuse) if fuse is not None else evidence_classes(classes)
    for other in SLOTS:
        reader = getattr(package, other)
        if other == slot or reader is None:
            continue
        overlap = sorted(may & {CLASSES[c] for c in reader.fused_classes()})
        if overlap:
            raise ValueError(
                f"{', '.join(overlap)} already joins the {other} reader's evidence in {name}:"
                f" a {slot} reader fuses other classes (--fuse)"
            )


def add_convexity(
    package: ModelPackage,
    train_items: Sequence[datasets.StudyItem],
    fit_items: Sequence[datasets.StudyItem],
    *,
    version: str,
    data: dict[str, list[str]],
    target_sensitivity: float = 0.95,
    workers: int = 1,
    seed: int = 0,
    classes: tuple[str, ...] = EXTRA_AXIAL,
    slot: str = "convexity",
    fuse: tuple[str, ...] | None = None,
    source: NetSource | None = None,
    cache: FeatureCache | None = None,
    cross: bool = False,
    floor: bool = False,
    either: bool = False,
    **net_settings: Any,
) -> dict[str, Any]:
    """Trains the strip network on ``train_items``, fits its fusion and the fused classes'
    operating points (out of fold) on ``fit_items``, and writes all of it into ``package``.

    ``source``: a trained network and its strip settings are taken from a reader of another
    package instead of training one (``train_items`` then empty, ``classes`` those it reads);
    the caller has checked that ``fit_items`` are not studies it trained on.

    ``slot`` is one of SLOTS: "convexity" (the first reader), "sulcal", "crescent" or "lens"
    (readers fused only for the classes in ``fuse``); ``fuse`` limits the classes its evidence
    may join (None: every class it has evidence for, "any" included). No two readers fuse one
    class (`check_slot`). A reader the package already has in that slot is replaced. ``cache``: the
    ensemble's embeddings of fit studies seen before are read from there. Returns the record
    it adds to the package's training."""
    started = time.time()
    if source is not None:
        classes = source.reader.net.classes
    check_slot(package, slot, fuse, classes)
    for items, what in ((train_items, "training"), (fit_items, "fit")):
        keys = [datasets.item_key(i) for i in items]
        if len(set(keys)) < len(keys):
            raise ValueError(f"a {what} study is given twice (one set named twice?)")
    old = getattr(package, slot)
    if old is not None:  # replaced: its classes start again from the flags they had before it
        if old.ensemble_thresholds is None:
            raise ValueError(
                f"{package.name} {package.version} already has a {slot} reader without the"
                " operating points from before it: build from the package it was made from"
            )
        package.thresholds = old.unread_thresholds(package.thresholds)
        # what those restored points did on validation, where the old reader kept it
        before = package.training.get(slot, {}).get("operating_points_before", {})
        chosen = package.training.get("operating_points_on_validation", {})
        for c in old.fused_classes():
            chosen.pop(CLASSES[c], None)
            if CLASSES[c] in before:
                chosen[CLASSES[c]] = before[CLASSES[c]]
        setattr(package, slot, None)
    if source is None:
        cfg = StripConfig()
        classes = check_classes(classes)
        net, losses = train_net(
            strip_store(train_items, cfg, workers=workers, classes=classes),
            seed=seed,
            classes=classes,
            **net_settings,
        )
        given = {**TRAIN_DEFAULTS, **net_settings}
        net_record: dict[str, Any] = {**given, "seed": seed, "loss_per_epoch": losses}
        train_keys = {datasets.pseudonym(datasets.item_key(i)) for i in train_items}
    else:
        cfg, classes = source.reader.strips, source.reader.net.classes
        net = copy.deepcopy(source.reader.net)
        # taken_from: the package the network was trained in, however often it was taken since
        net_record = {"taken_from": source.name, **source.record["net"]}
        train_keys = datasets.recorded(source.train_keys)
    reader = ConvexityReader(
        net, cfg, np.full((len(CLASSES), 3), np.nan), ensemble_thresholds=package.thresholds.copy()
    )
    position = SLOTS.index(slot)
    earlier = [r for s in SLOTS[:position] if (r := getattr(package, s)) is not None]
    later = [r for s in SLOTS[position + 1 :] if (r := getattr(package, s)) is not None]
    ensemble, strips, labels, own = fit_inputs(
        Predictor(package, torch.device("cpu")), reader, fit_items, earlier, cache
    )
    fusion, out_of_fold, per_class = fit_fusion(
        ensemble,
        strips,
        labels,
        seed=seed,
        classes=classes,
        fuse=fuse,
        patients=[i.patient_id for i in fit_items],
        own=own if cross else None,
        floor=floor,
        either=either,
    )
    if fuse is not None and not per_class:
        raise ValueError(
            f"no class of --fuse {', '.join(fuse)} has both positive and negative fit studies"
            " the strips can read: nothing to fit"
        )
    reader.fusion = fusion
    if cross:
        reader.cross = np.zeros((len(CLASSES), len(CLASSES)))
        for name, r in per_class.items():
            for other, weight in r.get("cross_weights", {}).items():
                reader.cross[CLASSES.index(name), CLASSES.index(other)] = weight
    if either:
        reader.either = np.full((len(CLASSES), 6), np.nan)
        for name, r in per_class.items():
            if "either" in r:
                reader.either[CLASSES.index(name)] = r["either"]
    if floor:
        reader.floors = np.full(len(CLASSES), -np.inf)
        for name, r in per_class.items():
            if r.get("floor") is not None:
                reader.floors[CLASSES.index(name)] = r["floor"]
    probabilities = 1.0 / (1.0 + np.exp(-out_of_fold))
    fused = np.isin(np.arange(len(CLASSES)), reader.fused_classes())
    # A fused class's flag is chosen on the studies its fused score is used on: those the
    # strips read (a series they cannot read is flagged at the ensemble's own threshold).
    readable = ~np.isnan(strips).any(axis=1)
    for c in np.flatnonzero(fused):
        known = ~np.isnan(labels[:, c]) & readable
        package.thresholds[c] = threshold_for_sensitivity(
            labels[known, c] == 1, probabilities[known, c], target_sensitivity
        )
    fused_names = [CLASSES[c] for c in np.flatnonzero(fused)]
    for r in later:  # their fallback: their own classes as before, the others as they are now
        if r.ensemble_thresholds is not None:
            r.ensemble_thresholds = r.unread_thresholds(package.thresholds)
    record: dict[str, Any] = {
        "from": f"{package.name} {package.version}",
        "data": data,
        "train_studies": len(train_keys),
        "fit_studies": len(fit_items),
        "unreadable_fit_studies": int(np.isnan(strips).any(axis=1).sum()),
        "net": net_record,
        "net_trained_on": sorted(train_keys),
        "fit_seed": seed,
        "strip_classes": list(classes),
        "fuse_only": None if fuse is None else list(fuse),
        "cross_class": cross,
        "floor": floor,
        "either": either,
        "strips": vars(cfg).copy(),
        "classes": per_class,
        "fused": fused_names,
        "seconds": round(time.time() - started),
    }
    # The fused flags' thresholds and what they do, out of fold, on the fit studies (and what
    # the points they replace did, for when this reader is replaced in turn).
    chosen_on = package.training.setdefault("operating_points_on_validation", {})
    record["operating_points_before"] = {n: chosen_on[n] for n in fused_names if n in chosen_on}
    on_readable = labels.copy()
    on_readable[np.ix_(~readable, fused)] = np.nan  # as the thresholds were chosen
    on_fit = operating_point_record(
        probabilities, on_readable, package.thresholds, gate_by_any=False
    )
    for name, r in on_fit.items():
        if name in fused_names:
            chosen_on[name] = r
    split = package.training.setdefault("split", {})
    split[slot] = sorted(train_keys | {datasets.pseudonym(datasets.item_key(i)) for i in fit_items})
    package.training[slot] = record
    setattr(package, slot, reader)
    package.version = version
    return record
