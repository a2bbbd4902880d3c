"""`ich evaluate MODEL DATASET`: AUC with 95% bootstrap intervals, sensitivity and specificity at
the saved operating points (study and slice level), ROC curves, calibration, a pointing game where
the data has masks or boxes, a JSON report and a Markdown model card."""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inference import datasets
from inference.constants import CLASS_LABELS, CLASSES, SUBTYPES
from inference.data import DataSource, read_source
from inference.dicom_io import CTSeries
from inference.metrics import at_threshold, bootstrap_auc, calibration, roc_curve
from inference.package import READER_SLOTS
from inference.predictor import Predictor, StudyPrediction
from inference.preprocess import hu_from_windowed
from inference.progress import progress


@dataclass
class Collected:
    names: list[str] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    study_labels: list[np.ndarray] = field(default_factory=list)
    study_probs: list[np.ndarray] = field(default_factory=list)
    study_flags: list[np.ndarray] = field(default_factory=list)
    study_thresholds: list[np.ndarray] = field(default_factory=list)  # those the flags used
    slice_labels: list[np.ndarray] = field(default_factory=list)
    slice_probs: list[np.ndarray] = field(default_factory=list)
    pointing_hits: dict[str, list[bool]] = field(default_factory=lambda: {c: [] for c in CLASSES})
    pointing_strict: dict[str, list[bool]] = field(default_factory=lambda: {c: [] for c in CLASSES})
    pointing_chance: dict[str, list[float]] = field(
        default_factory=lambda: {c: [] for c in CLASSES}
    )
    # per miss: did the peak fall on another subtype's blood (a confusion, not a stray peak)?
    pointing_miss_on_other: dict[str, list[bool]] = field(
        default_factory=lambda: {c: [] for c in CLASSES}
    )
    per_study: list[dict[str, Any]] = field(default_factory=list)


def picture_series(item: "datasets.SliceItem", predictor: Predictor) -> CTSeries:
    """A windowed 8-bit picture as a one-slice series without pixel spacing."""
    picture = np.asarray(Image.open(item.image_path).convert("L"))
    hu = hu_from_windowed(picture, predictor.package.preprocess.windowed_source)[None]
    return CTSeries(
        hu=hu,
        positions_mm=np.zeros(1),
        pixel_spacing_mm=None,  # type: ignore[arg-type]
        study_instance_uid=item.image_path.stem,
        series_instance_uid=item.image_path.stem,
        sop_instance_uids=[item.image_path.stem],
        instance_numbers=[1],
        sources=[str(item.image_path)],
        skipped=[],
        modality="OT",
        body_part="HEAD",
        series_description="windowed picture",
    )


def evaluate(
    model_path: Path | None,
    source: DataSource,
    out_dir: Path,
    *,
    exclude_training: bool = True,
    bootstrap_rounds: int = 1000,
    device: str | None = None,
    title: str | None = None,
    note: str | None = None,
    also: Sequence[tuple[Path, Path]] = (),
) -> dict[str, Any]:
    """Evaluates the model at ``model_path`` on ``source`` and writes its report, ROC curve and
    card to ``out_dir``. Each (model, out dir) of ``also`` is a package with the same networks
    (from ``ich refit-heads``): it is scored from the same pass of the networks and gets the
    report a separate evaluation would write, for about the cost of one."""
    items = read_source(source)  # bad data is named before a model is loaded
    predictor = Predictor.load(model_path, device=device)
    others = [Predictor.load(path, device=device) for path, _ in also]
    if exclude_training:
        items = _held_out(items, predictor)
        for path, other in zip((p for p, _ in also), others, strict=True):
            if _held_out(items, other) != items:
                raise ValueError(
                    f"{path} was trained on some of these items and {model_path} was not: "
                    "evaluate it on its own"
                )
    if not items:
        raise ValueError("no items left to evaluate (all were used in training?)")
    items, copies = one_per_group(items)
    if copies:
        print(f"{copies} copies of pictures already in the set are counted once")
    collected = [Collected() for _ in range(1 + len(others))]
    for item in progress(items, desc=f"evaluate {source.kind}", unit="item"):
        _evaluate_item(item, predictor, others, collected)
    reports = []
    for p, c, out in zip(
        [predictor, *others], collected, [out_dir, *(o for _, o in also)], strict=True
    ):
        report = _report(p, source, c, bootstrap_rounds)
        report["dataset"].update(
            {
                "title": title,
                "note": note,
                "held_out_only": exclude_training,
                "copies_left_out": copies,
            }
        )
        out.mkdir(parents=True, exist_ok=True)
        _roc_png(c, out / "roc_study.png", p)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "MODEL_CARD.md").write_text(model_card(p, [report]))
        reports.append(report)
    return reports[0]


def one_per_group(items: Sequence[Any]) -> tuple[list[Any], int]:
    """The items with each picture counted once, and how many copies were left out. A set of
    pictures can hold several copies of one slice (roboflow-ich's `*_jpg.rf.*` files, named by
    their ``group``): counted each time, one slice would weigh as several."""
    kept, seen = [], set()
    for item in items:
        group = getattr(item, "group", "") if isinstance(item, datasets.SliceItem) else ""
        if group and group in seen:
            continue
        seen.add(group)
        kept.append(item)
    return kept, len(items) - len(kept)


def _held_out(items: Sequence[Any], predictor: Predictor) -> list[Any]:
    split = predictor.package.training.get("split", {})
    parts = ("train", "val", "heads", *READER_SLOTS)
    seen = datasets.recorded(key for part in parts for key in split.get(part, []))
    return [i for i in items if datasets.pseudonym(datasets.item_key(i)) not in seen]


def _evaluate_item(
    item: Any, predictor: Predictor, others: list[Predictor], collected: list[Collected]
) -> None:
    has_masks = bool(getattr(item, "masks_path", None)) or bool(getattr(item, "boxes", None))
    if isinstance(item, datasets.SliceItem):
        series: Any = picture_series(item, predictor)
        slice_labels = np.asarray(item.labels, np.float32)[None]
    else:
        from inference.dicom_io import load_series

        series = load_series(item.paths, skip_bad=True)
        slice_labels = _slice_labels(item, series)
    predictions = predictor.predict_shared(series, others, heatmaps=has_masks, basis=False)
    for prediction, into in zip(predictions, collected, strict=True):
        _collect(item, series, prediction, slice_labels, has_masks, into)


def _collect(
    item: Any,
    series: CTSeries,
    prediction: StudyPrediction,
    slice_labels: np.ndarray,
    has_masks: bool,
    collected: Collected,
) -> None:
    probs = np.array([prediction.probabilities[c] for c in CLASSES])
    collected.names.append(datasets.item_key(item))
    collected.patients.append(str(item.patient_id))
    collected.study_labels.append(np.asarray(item.labels, np.float32))
    collected.study_probs.append(probs)
    collected.study_flags.append(np.array([prediction.flags[c] for c in CLASSES]))
    collected.study_thresholds.append(np.array([prediction.thresholds[c] for c in CLASSES]))
    collected.slice_labels.append(slice_labels)
    collected.slice_probs.append(prediction.slice_probabilities)
    collected.per_study.append(
        {
            "item": datasets.item_key(item),
            "labels": {c: _int_or_none(item.labels[i]) for i, c in enumerate(CLASSES)},
            # six significant figures: rounding to places tied the small ones, and a ship
            # rule's AUC from these would differ from the report's
            "probabilities": {c: float(f"{probs[i]:.6g}") for i, c in enumerate(CLASSES)},
            "flags": prediction.flags,
            "flag_correct": {
                c: (
                    None
                    if np.isnan(item.labels[i])
                    else bool(prediction.flags[c]) == bool(item.labels[i])
                )
                for i, c in enumerate(CLASSES)
            },
        }
    )
    if has_masks:
        _pointing(item, series, prediction, slice_labels, collected)


def _int_or_none(value: float) -> int | None:
    return None if np.isnan(value) else int(value)


def _slice_labels(item: "datasets.StudyItem", series: CTSeries) -> np.ndarray:
    labels = np.full((len(series.sop_instance_uids), len(CLASSES)), np.nan, np.float32)
    for i, uid in enumerate(series.sop_instance_uids):
        if item.slice_labels and uid in item.slice_labels:
            labels[i] = item.slice_labels[uid]
    return labels


def _masks(item: Any, series: CTSeries) -> np.ndarray | None:
    """(N, H, W) bit flags on the series' own grid, or None."""
    if isinstance(item, datasets.SliceItem):
        from inference.data import _boxes_to_mask

        return _boxes_to_mask(item.boxes, series.hu.shape[1:])[None]
    with np.load(item.masks_path, allow_pickle=False) as stored:
        order = {str(u): i for i, u in enumerate(stored["sop_instance_uids"])}
        if not all(u in order for u in series.sop_instance_uids):
            return None
        return stored["masks"][[order[u] for u in series.sop_instance_uids]]


POINTING_TOLERANCE_MM = 7.5  # the pointing game's 15 pixels (Zhang et al.) at 0.5 mm
POINTING_STRICT_MM = 1.5
ALL_SUBTYPE_BITS = (1 << len(SUBTYPES)) - 1  # the masks' subtype bit flags, all set
PICTURE_KINDS = ("yolo", "image_folder")  # data kinds whose items are single windowed pictures
# How slices are flagged at slice level: the package's operating points carried to one slice
# (ModelPackage.slice_thresholds), or 0.5 where a sequence model pools the slices.
SLICE_RULE = (
    "a slice is flagged where it alone would make the ensemble flag the study: the ensemble's"
    " own operating points (before any strip reader) carried through the calibration to one"
    " slice; a subtype only together with any"
)
SLICE_RULE_FALLBACK = (
    "0.5 for every class: this package pools slices with a sequence model, so its operating"
    " points do not carry to one slice; a subtype only together with any"
)


def _pointing(
    item: Any,
    series: CTSeries,
    prediction: StudyPrediction,
    slice_labels: np.ndarray,
    collected: Collected,
) -> None:
    """For each correctly flagged positive slice: does the attention peak fall on the bleed?

    A hit is a peak within POINTING_TOLERANCE_MM of the bleed (the pointing game's usual 15-pixel
    tolerance); the strict rate allows POINTING_STRICT_MM. The chance rate is what a peak
    anywhere in the head would score: the tolerant bleed's share of the head.
    """
    masks = _masks(item, series)
    if masks is None:
        return
    # a picture has no pixel spacing: its tolerances are in pixels (the report says so)
    spacing = float(np.mean(series.pixel_spacing_mm)) if series.pixel_spacing_mm else 1.0
    for name, heatmap in prediction.heatmaps.items():
        c = CLASSES.index(name)
        bits = ALL_SUBTYPE_BITS if c == 0 else 1 << (c - 1)
        for s in range(len(heatmap)):
            inside = (masks[s] & bits) > 0
            positive = slice_labels[s, c] == 1 or (np.isnan(slice_labels[s, c]) and inside.any())
            if not (positive and prediction.slice_probabilities[s, c] >= 0.5 and inside.any()):
                continue
            to_class, to_other = peak_distances(heatmap[s], masks[s], bits)
            distance_mm = to_class * spacing
            hit = distance_mm <= POINTING_TOLERANCE_MM
            collected.pointing_hits[name].append(hit)
            collected.pointing_strict[name].append(distance_mm <= POINTING_STRICT_MM)
            if not hit:
                collected.pointing_miss_on_other[name].append(
                    to_other is not None and to_other * spacing <= POINTING_TOLERANCE_MM
                )
            head = series.hu[s] > -500
            target = _dilate(inside, round(POINTING_TOLERANCE_MM / spacing))
            collected.pointing_chance[name].append(
                float((target & head).sum() / max(head.sum(), 1))
            )


def peak_distances(heatmap: np.ndarray, mask: np.ndarray, bits: int) -> tuple[float, float | None]:
    """Pixels from the heatmap's peak to the nearest pixel of the class (``bits`` of the mask's
    subtype bit flags; the class must be present) and to the nearest pixel of any other subtype's
    blood (None where the slice has none)."""
    peak = np.array(np.unravel_index(int(np.argmax(heatmap)), heatmap.shape))

    def nearest(region: np.ndarray) -> float:
        return float(np.sqrt(((np.argwhere(region) - peak) ** 2).sum(1)).min())

    other = (mask & (ALL_SUBTYPE_BITS & ~bits)) > 0
    return nearest((mask & bits) > 0), (nearest(other) if other.any() else None)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """The mask grown by ``radius`` pixels (a square, by separable running maxima; a square
    holds the tolerance's disc, so the chance rate errs high, never low). Nothing wraps
    around the image's edge."""
    height, width = mask.shape
    out = np.pad(mask, radius)
    for axis in (0, 1):
        grown = out.copy()
        for shift in range(1, radius + 1):
            grown |= np.roll(out, shift, axis) | np.roll(out, -shift, axis)
        out = grown
    return out[radius : radius + height, radius : radius + width]


def _level(
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray,
    rounds: int,
    flags: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """AUC per class, and sensitivity and specificity of the model's flags where given (a
    subtype is flagged only with "any"), else of the thresholds. ``groups``: each row's group
    (patient, or study for slices), resampled whole for the AUC's interval."""
    out = {}
    for i, name in enumerate(CLASSES):
        known = ~np.isnan(labels[:, i])
        y, p = labels[known, i] == 1, probs[known, i]
        auc, low, high = bootstrap_auc(
            y, p, rounds=rounds, groups=None if groups is None else groups[known]
        )
        point = (
            at_threshold(y, p, float(thresholds[i]))
            if flags is None
            else at_threshold(y, flags[known, i].astype(float), 0.5)
        )
        out[name] = {
            "n": int(known.sum()),
            "positives": int(y.sum()),
            "auc": _round(auc),
            "auc_95ci": [_round(low), _round(high)],
            "threshold": _round(float(thresholds[i])),
            "sensitivity": _round(point.sensitivity),
            "specificity": _round(point.specificity),
            "calibration": calibration(y, p) if known.any() else None,
        }
    return out


def _round(value: float) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), 4)


def _report(predictor: Predictor, source: DataSource, c: Collected, rounds: int) -> dict[str, Any]:
    # The operating points the flags used: the package's, or for a class a strip reader fuses,
    # the ensemble's own on series no reader could read (pictures). One value per class where
    # every item used the same, else NaN and the values listed.
    used = np.stack(c.study_thresholds or [predictor.package.thresholds])  # (items, 6)
    same = (used == used[0]).all(axis=0)
    thresholds = np.where(same, used[0], np.nan)
    patients = np.array(c.patients)
    study = _level(
        np.stack(c.study_labels),
        np.stack(c.study_probs),
        thresholds,
        rounds,
        np.stack(c.study_flags),
        groups=patients,
    )
    for i, name in enumerate(CLASSES):
        if not same[i]:
            study[name]["thresholds_used"] = [_round(float(t)) for t in np.unique(used[:, i])]
    slices_l, slices_p = np.concatenate(c.slice_labels), np.concatenate(c.slice_probs)
    carried = predictor.package.slice_thresholds()
    slice_thresholds = np.full(len(CLASSES), 0.5) if carried is None else carried
    slice_rule = SLICE_RULE_FALLBACK if carried is None else SLICE_RULE
    # each slice is resampled with its patient's other slices (a picture is its own study)
    slice_patient = np.repeat(patients, [len(s) for s in c.slice_labels])
    several_per_patient = len(set(c.patients)) < len(c.names)
    has_slice_labels = bool((~np.isnan(slices_l[:, 0])).any())
    return {
        "model": {"name": predictor.name, "version": predictor.version},
        "dataset": {
            "kind": source.kind,
            "path": source.path,
            "items": len(c.names),
            "patients": len(set(c.patients)),
        },
        # What each 95% interval resamples: whole patients where a patient has several items
        # (the pictures of one patient are not independent), and for slices whole studies, or
        # whole patients where a patient has several studies or pictures.
        "bootstrap_resamples": {
            "study_level": "patients" if several_per_patient else "items",
            "slice_level": "patients" if several_per_patient else "studies",
        },
        "study_level": study,
        "slice_level_threshold": {
            name: _round(float(slice_thresholds[i])) for i, name in enumerate(CLASSES)
        },
        "slice_level_rule": slice_rule,
        "slice_level": _level(
            slices_l,
            slices_p,
            slice_thresholds,
            rounds,
            predictor.package.flags(slices_p, slice_thresholds),
            groups=slice_patient,
        )
        if has_slice_labels
        else None,
        "pointing_game": {
            name: {
                "slices": len(hits),
                "hit_rate": _round(float(np.mean(hits))) if hits else None,
                "tolerance_mm": POINTING_TOLERANCE_MM,
                "tolerance_unit": "px" if source.kind in PICTURE_KINDS else "mm",
                "strict_hit_rate": _round(float(np.mean(c.pointing_strict[name])))
                if hits
                else None,
                "strict_tolerance_mm": POINTING_STRICT_MM,
                "chance_rate": _round(float(np.mean(c.pointing_chance[name]))) if hits else None,
                "misses": len(c.pointing_miss_on_other[name]),
                "misses_on_another_bleed": int(sum(c.pointing_miss_on_other[name])),
            }
            for name, hits in c.pointing_hits.items()
        },
        "per_item": c.per_study,
    }


def _roc_png(c: Collected, path: Path, predictor: Predictor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, probs = np.stack(c.study_labels), np.stack(c.study_probs)
    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    for i, name in enumerate(CLASSES):
        known = ~np.isnan(labels[:, i])
        y = labels[known, i] == 1
        if y.any() and (~y).any():
            fpr, tpr, _ = roc_curve(y, probs[known, i])
            axis.plot(fpr, tpr, label=CLASS_LABELS[name])
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{predictor.name}: study ROC")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def model_card(predictor: Predictor, reports: Sequence[dict[str, Any]]) -> str:
    """A Markdown model card: data, metrics with the data they were measured on, use and limits."""
    package = predictor.package
    training = package.training
    windows = ", ".join(f"{w.level:g}/{w.width:g}" for w in package.preprocess.windows)
    members = ", ".join(m.variant for m in package.members)
    study_level = (
        "a bidirectional GRU over slice embeddings" if package.aggregator else "maximum over slices"
    )
    # Empty, or missing (models trained before it was recorded): every validation study.
    calibrated_on = training.get("calibrated_on") or ["every source"]
    chosen_on = ", ".join(
        f"{name} {auc:.3f}"
        for name, auc in (training.get("aggregator", {}).get("val_mean_study_auc") or {}).items()
    )
    config = training.get("config", {})
    lines = [
        f"# Model card: {predictor.name} {predictor.version}",
        "",
        "**Triage support, not diagnosis.** A computer-aided triage (CADt) model that flags head",
        "CT studies likely to show acute intracranial haemorrhage so a clinician reads them",
        "sooner. It never replaces a clinician's reading of the full images. Not a medical device.",
        "",
        "## Model",
        f"- Ensemble of {len(package.members)} {_initialised(training)} 2D CNNs ({members});",
        f"  windows {windows} (level/width) as channels; slice interpolation degree"
        f" {package.preprocess.interpolation_degree}; {package.preprocess.image_size} px at"
        f" {package.preprocess.spacing_mm} mm.",
        *_training_stages(training),
        f"- Study level: {study_level} (mean validation study AUC: {chosen_on or 'n/a'}),",
        f"  {_calibrated(package)} on the validation studies of {', '.join(calibrated_on)};"
        " operating points chosen for sensitivity"
        f" {config.get('target_sensitivity', 0.95)} on the validation studies of"
        f" {', '.join(config.get('operating_point_sources') or ['every source'])}.",
        "- Explanations: Grad-CAM at the last convolutional stage (output stride"
        f" {package.members[0].output_stride}); prediction basis from an atlas of confidently",
        "  correct training slices. Pointing game: a hit is an attention peak within"
        f" {POINTING_TOLERANCE_MM} mm of the bleed, on the positive slices of studies flagged"
        " for the class that the model scores at least 0.5 for it (pictures, which have no"
        " pixel spacing: within"
        f" {POINTING_TOLERANCE_MM} px).",
        "",
        "## Training data",
        f"- Sources: {', '.join(training.get('sources', [])) or 'unknown'}; items per part:"
        f" {training.get('counts')}.",
        f"- Settings: up to {config.get('epochs')} epochs x {config.get('samples_per_epoch')}"
        f" slices per network (early stop after {config.get('patience')} without gain), learning"
        f" rate {config.get('lr')}, attention loss weight {config.get('localisation_weight')},"
        f" seed {config.get('seed')}.",
        "",
        "## Operating points (calibrated probability)",
        "",
        " ".join(
            [
                'A subtype is flagged only when "any" is flagged too.',
                _gating_note(training.get("operating_points_on_validation")),
            ]
        ).strip(),
        "",
    ]
    lines += _operating_point_table(
        package.thresholds, training.get("operating_points_on_validation")
    )
    for report in reports:
        lines += _card_section(report)
    lines += [
        "",
        "## Intended use and limits",
        "- Intended use: prioritising a worklist of non-contrast head CT for clinicians' review.",
        "- Figures above hold only for the data they were measured on. Synthetic phantoms are far",
        "  easier than real CT; the real-data figures come from small public sets.",
        "- Not validated on clinical data from any site: a demonstration model until it is",
        "  trained and evaluated on real clinical data with radiologist labels.",
    ]
    return "\n".join(lines) + "\n"


def _initialised(training: dict[str, Any]) -> str:
    pretrained = training.get("config", {}).get("pretrained", True)
    return "ImageNet-initialised" if pretrained else "randomly initialised (no ImageNet weights)"


def _calibrated(package: Any) -> str:
    """What calibration the package holds: a class left at slope 1 and offset 0 was not fitted
    (a validation set too small or too odd to calibrate on keeps the plain sigmoid)."""
    plain = [
        CLASS_LABELS[c]
        for c, (a, b) in zip(CLASSES, np.asarray(package.calibration), strict=True)
        if a == 1.0 and b == 0.0
    ]
    if not plain:
        return "Platt-calibrated"
    if len(plain) == len(CLASSES):
        return "not calibrated (the Platt fit was refused for every class)"
    return f"Platt-calibrated except {', '.join(plain)} (fit refused: plain sigmoid)"


def _gating_note(on_validation: dict[str, dict[str, Any]] | None) -> str:
    if not on_validation:
        return ""
    if all(r.get("gated_by_any") for r in on_validation.values()):
        return "The validation sensitivity and specificity below are those of the flags."
    return (
        "The validation sensitivity and specificity below were recorded for each class on its "
        'own, before the "any" gate (this model predates recording them as flags): a subtype\'s '
        "flag can be less sensitive than its row says."
    )


def _operating_point_table(
    thresholds: np.ndarray, on_validation: dict[str, dict[str, float]] | None
) -> list[str]:
    """Each class's threshold and, for models that recorded it, what it did on the validation
    studies it was chosen on (sensitivity and specificity, with the counts)."""
    if not on_validation:  # models trained before it was recorded
        rows = [f"| {CLASS_LABELS[c]} | {thresholds[i]:.3f} |" for i, c in enumerate(CLASSES)]
        return ["| class | threshold |", "| --- | --- |", *rows]
    rows = []
    for i, c in enumerate(CLASSES):
        r = on_validation.get(c)
        if r is None:  # a point restored when the reader that chose it was replaced
            rows.append(f"| {CLASS_LABELS[c]} | {thresholds[i]:.3f} | not recorded | |")
            continue
        rows.append(
            f"| {CLASS_LABELS[c]} | {thresholds[i]:.3f} | {r['sensitivity']:.2f}"
            f" ({r['positives']} positive) | {r['specificity']:.2f} ({r['negatives']} negative) |"
        )
    head = "| class | threshold | validation sensitivity | validation specificity |"
    return [head, "| --- | --- | --- | --- |", *rows]


def _training_stages(training: dict[str, Any]) -> list[str]:
    lines = []
    if training.get("initialised_from"):
        lines.append(
            f"- Networks continued from {training['initialised_from']} (an earlier training"
            " stage), not from ImageNet directly."
        )
    if training.get("members_from"):
        lines.append(
            f"- Slice networks as trained in {training['members_from']}; study level,"
            " calibration, operating points and atlas fitted again on the same split."
        )
    heads = training.get("heads_refit")
    if heads:
        lines.append(_heads_line(heads))
    if training.get("convexity"):
        lines.append(_convexity_line(training["convexity"]))
    later = [slot for slot in READER_SLOTS[1:] if training.get(slot)]
    for ordinal, slot in zip(("second", "third", "fourth"), later, strict=False):
        lines.append(_later_reader_line(slot, training[slot], ordinal))
    return lines


def _fused_text(record: dict[str, Any]) -> str:
    """The classes a strip reader joined, with their study AUC before and after (out of fold)."""
    return ", ".join(
        f"{name} {r['ensemble_auc']:.3f} to {r['fused_auc_out_of_fold']:.3f}"
        for name, r in record["classes"].items()
        if name in record["fused"]
    )


def _taken_text(record: dict[str, Any]) -> str:
    """Where a reader's network was trained, when `--net-from` took it from another package."""
    taken = record.get("net", {}).get("taken_from")
    return f" (the network taken unchanged from {taken})" if taken else ""


def _later_reader_line(slot: str, record: dict[str, Any], ordinal: str = "second") -> str:
    """How `ich convexity --reader SLOT` joined another strip network's evidence."""
    fused = _fused_text(record)
    return (
        f"- A {ordinal} strip network (`ich convexity --reader {slot}`, from {record['from']})"
        f" reads {' and '.join(record['strip_classes'])} blood in the same strips, trained on"
        f" {record['train_studies']} phantom studies with masks{_taken_text(record)}; its"
        " evidence joins only"
        f" {', '.join(record['fuse_only'] or [])}, which no other reader joins, {_how(record)},"
        " where it was kept only if"
        f" it raised the out-of-fold study AUC: {fused or 'no class'}. The other classes keep"
        " their scores and operating points."
    )


def _how(record: dict[str, Any]) -> str:
    """How a reader's evidence joins the ensemble's, and on how many studies it was fitted."""
    fitted = f"fitted on {record['fit_studies']} other studies"
    if record.get("either"):
        return (
            "as the larger of the ensemble's and the strips' own calibrated logits, recalibrated"
            f' (an "either" fusion: either reader alone can raise the score), {fitted}'
        )
    floor = " with a floor under the ensemble's logit" if record.get("floor") else ""
    return f"by a logistic regression{floor}, {fitted}{_cross_text(record)}"


def _cross_text(record: dict[str, Any]) -> str:
    """What a cross-class fusion (`ich convexity --cross`) reads besides its own class."""
    if not record.get("cross_class"):
        return ""
    return (
        " that also reads the ensemble's logits of the other five classes (evidence of another"
        " bleed can lower the score)"
    )


def _convexity_line(record: dict[str, Any]) -> str:
    """How `ich convexity` joined the strip network's evidence to the ensemble's."""
    fused = _fused_text(record)
    read = record.get("strip_classes", ["subdural", "epidural"])
    what = " and ".join(read) if len(read) < 3 else f"{', '.join(read[:-1])} and {read[-1]}"
    return (
        f"- {what.capitalize()} blood also read along the inner table (`ich convexity`, from"
        f" {record['from']}): each slice unrolled into a strip at the scan's own pixel size and"
        f" read by a small CNN trained on {record['train_studies']} phantom studies with masks"
        f"{_taken_text(record)};"
        f" its study evidence is joined to the ensemble's per class {_how(record)}. Fused where"
        " it raised the"
        f" out-of-fold study AUC there: {fused or 'no class'}. Heatmaps and the prediction"
        " basis still come from the ensemble; a series with no readable strip (a windowed"
        " picture) is scored and flagged by the ensemble alone, at its own operating points,"
        " not those in the table below."
    )


def _heads_line(heads: dict[str, Any]) -> str:
    cv = heads["cross_validated_study_auc"]
    chosen = cv[f"{heads['l2_chosen']:g}"]
    how = (
        f"chosen by {heads['folds']}-fold cross-validation (mean"
        if len(cv) > 1
        else f"fixed; {heads['folds']}-fold cross-validation gives a mean"
    )
    line = (
        f"- Slice head refitted (`ich refit-heads`, from {heads['from']}): one linear head over"
        f" every member's embeddings, fitted on {heads['studies']} fresh phantom studies the"
        f" networks never trained on ({', '.join(heads['data'])}); L2 weight"
        f" {heads['l2_chosen']:g} {how} out-of-fold study AUC {chosen['mean']:.3f}, against"
        f" {heads['members_own_heads_study_auc']['mean']:.3f} with the members' own heads)."
    )
    if heads.get("attention_weight"):
        rates = chosen.get("attention_near_bleed") or {}
        shares = ", ".join(f"{name} {rate:.0%}" for name, rate in rates.items() if rate is not None)
        line += (
            f" The fit includes the networks' localisation term (weight"
            f" {heads['attention_weight']:g}, on {heads['attention_slices']['slices']} outlined"
            " bleed slices), which keeps each class's Grad-CAM on the bleed; out of fold, its peak"
            f" fell near the bleed on {shares} of those slices."
        )
    if "attention_within_drop" in heads:
        drop = heads.get("max_attention_drop", 0.05)
        sweep = heads.get("attention_weight_sweep")
        weights = ", ".join(sorted({f"{e['attention_weight']:g}" for e in sweep or []}, key=float))
        if heads.get("attention_within_drop") is False:
            line += (
                f" No setting{f' (weights {weights})' if sweep else ''} kept every class's"
                f" peak near the bleed within {drop:g} of the members' own heads, so for some"
                " class this head's Grad-CAM points at the bleed less often than theirs did."
            )
        elif sweep:
            line += (
                f" The weight was chosen from {weights} by cross-validation: the highest"
                " out-of-fold AUC among the settings whose peaks fell near the bleed at most"
                f" {drop:g} less often than with the members' own heads, for every class."
            )
    return (
        line + " Calibration and operating points are fitted on the out-of-fold study scores; the"
        " atlas is kept from the networks' training."
    )


def _card_section(report: dict[str, Any]) -> list[str]:
    d = report["dataset"]
    title = d.get("title") or f"{d['kind']} ({d['path']})"
    lines = ["", f"## Measured on {title}: {d['items']} items", ""]
    if d.get("note"):
        lines += [d["note"], ""]
    pictures = d["kind"] in PICTURE_KINDS  # each item one windowed picture, not a study
    unit = "picture" if pictures else "study"
    by_patient = report.get("bootstrap_resamples", {}).get("study_level") == "patients"
    interval = f"95% CI, {d.get('patients')} patients resampled" if by_patient else "95% CI"
    lines += [
        f"| class | n (pos) | {unit} AUC [{interval}] | sensitivity | specificity"
        " | pointing game |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in CLASSES:
        s = report["study_level"][c]
        pg = report["pointing_game"][c]
        ci = s["auc_95ci"]
        auc = "n/a" if s["auc"] is None else f"{s['auc']:.3f} [{_fmt(ci[0])}, {_fmt(ci[1])}]"
        pointing = (
            "n/a"
            if pg["hit_rate"] is None
            else f"{pg['hit_rate']:.0%} of {pg['slices']} "
            f"(chance {pg.get('chance_rate') or 0:.0%}; "
            f"within {pg.get('strict_tolerance_mm', 1.5)} {pg.get('tolerance_unit', 'mm')}:"
            f" {pg.get('strict_hit_rate') or 0:.0%})"
        )
        if pg.get("misses"):
            pointing += (
                f"; {pg['misses_on_another_bleed']} of {pg['misses']} misses on another bleed"
            )
        lines.append(
            f"| {CLASS_LABELS[c]} | {s['n']} ({s['positives']}) | {auc} | "
            f"{_fmt(s['sensitivity'])} | {_fmt(s['specificity'])} | {pointing} |"
        )
    if report.get("slice_level") and not pictures:
        lines += _slice_table(report)
    if len(report["per_item"]) <= 10:
        lines += _per_item_table(report["per_item"])
    return lines


def _slice_table(report: dict[str, Any]) -> list[str]:
    """Slice level: AUC, and sensitivity and specificity at the slice thresholds the report
    names (a report from before they were carried to slices says 0.5)."""
    thresholds = report.get("slice_level_threshold", 0.5)
    if not isinstance(thresholds, dict):
        thresholds = {c: thresholds for c in CLASSES}
    rule = report.get("slice_level_rule") or "0.5 for every class"
    by = report.get("bootstrap_resamples", {}).get("slice_level", "studies")
    lines = [
        "",
        f"Slice level, each slice against its own labels. Slice threshold: {rule}.",
        "",
        f"| class | slices (pos) | slice AUC [95% CI, {by} resampled] | slice threshold"
        " | sensitivity | specificity |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in CLASSES:
        s = report["slice_level"][c]
        ci = s["auc_95ci"]
        auc = "n/a" if s["auc"] is None else f"{s['auc']:.3f} [{_fmt(ci[0])}, {_fmt(ci[1])}]"
        lines.append(
            f"| {CLASS_LABELS[c]} | {s['n']} ({s['positives']}) | {auc} | "
            f"{'n/a' if thresholds[c] is None else format(thresholds[c], '.3g')} | "
            f"{_fmt(s['sensitivity'])} | {_fmt(s['specificity'])} |"
        )
    return lines


def _per_item_table(items: list[dict[str, Any]]) -> list[str]:
    """Small sets are shown study by study: probability per class, and whether the flag is right."""
    lines = [
        "",
        "| item | " + " | ".join(CLASS_LABELS[c] for c in CLASSES) + " |",
        "| --- |" + " --- |" * len(CLASSES),
    ]
    for item in items:
        cells = []
        for c in CLASSES:
            label, correct = item["labels"][c], item["flag_correct"][c]
            mark = "" if correct is None else (" ✓" if correct else " ✗")
            flag = "flagged" if item["flags"][c] else "not flagged"
            truth = "?" if label is None else ("positive" if label else "negative")
            cells.append(f"{item['probabilities'][c]:.2f} {flag}, {truth}{mark}")
        lines.append(f"| {item['item']} | " + " | ".join(cells) + " |")
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
