"""`ich train`: slice CNNs, then the study aggregator, calibration, operating points and atlas.

Reproducible (seeded), with progress bars, augmentation, balanced sampling against class
imbalance, early stopping on validation, checkpoints and per-epoch metrics in JSON lines.
"""

import json
import math
import random
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from inference import datasets
from inference.atlas import build_atlas
from inference.constants import CLASSES
from inference.data import (
    Augment,
    DataSource,
    SliceSampler,
    Volume,
    prepare,
    read_source,
    slice_input,
)
from inference.feature_cache import FeatureCache, member_outputs, networks_fingerprint
from inference.metrics import roc_auc, threshold_for_sensitivity
from inference.models import (
    AggregatorConfig,
    EfficientNetLite,
    StudyAggregator,
    build_slice_model,
    folded_for_inference,
)
from inference.package import ModelPackage, aggregator_features, platt, round_as_saved
from inference.preprocess import PreprocessConfig, Window
from inference.progress import progress as progress_bar

CLASS_WEIGHTS = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # "any" counts double, as in RSNA 2019


AGGREGATORS = ("auto", "gru", "max")  # the study level: chosen on validation, or as named


@dataclass
class TrainConfig:
    name: str = "ich-model"
    version: str = "0.1.0"
    out_dir: str = "runs/model"
    sources: list[DataSource] = field(default_factory=list)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    architectures: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1")
    pretrained: bool = True
    # A model package whose members (matched by architecture) start this run instead of ImageNet:
    # a second, finer stage of training (for example at a higher resolution) on top of a first.
    init_from: str | None = None
    epochs: int = 6
    samples_per_epoch: int = 2000
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-4
    patience: int = 2
    seed: int = 0
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    positive_fraction: float = 0.5
    # Weight of the attention loss on slices whose bleed is outlined (phantom masks, boxes): the
    # class evidence map should peak inside the blood. 0 turns it off.
    localisation_weight: float = 0.5
    # Output stride of the last convolutional stage (32 as on ImageNet; 16 or 8 computes it more
    # densely): finer class evidence maps to train the localisation on and to explain with.
    output_stride: int = 32
    # Dataset kinds whose validation studies choose the operating points (empty: every kind).
    operating_point_sources: tuple[str, ...] = ()
    augment: Augment = field(default_factory=Augment)
    aggregator: str = "auto"  # one of AGGREGATORS; auto: the better on validation
    aggregator_epochs: int = 80
    target_sensitivity: float = 0.95
    atlas_per_class: int = 12
    threads: int = 0  # 0: every core
    device: str = "auto"

    @classmethod
    def from_toml(cls, path: Path) -> "TrainConfig":
        with open(path, "rb") as handle:
            try:
                raw = tomllib.load(handle)
            except tomllib.TOMLDecodeError as error:
                raise ValueError(f"{path}: not valid TOML ({error})") from None
        return cls.from_dict(raw, base=path.parent)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base: Path = Path()) -> "TrainConfig":
        raw = dict(raw)
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
        if raw.get("aggregator", "auto") not in AGGREGATORS:
            raise ValueError(
                f"aggregator is one of {', '.join(AGGREGATORS)}, not {raw['aggregator']!r}"
            )
        sources = [
            DataSource(**_table(DataSource, s, "[[sources]]")) for s in raw.pop("sources", [])
        ]
        for source in sources:
            source.path = (
                str((base / source.path).resolve())
                if not Path(source.path).is_absolute()
                else source.path
            )
        for key in ("init_from", "out_dir"):  # like the sources: relative to the config file
            if raw.get(key) and not Path(raw[key]).is_absolute():
                raw[key] = str((base / raw[key]).resolve())
        preprocess = _table(PreprocessConfig, raw.pop("preprocess", {}), "[preprocess]")
        if "windows" in preprocess:
            preprocess["windows"] = tuple(Window(*w) for w in preprocess["windows"])
        if "windowed_source" in preprocess:
            preprocess["windowed_source"] = Window(*preprocess["windowed_source"])
        augment = Augment(**_table(Augment, raw.pop("augment", {}), "[augment]"))
        for key in ("architectures", "split", "operating_point_sources"):
            if key in raw:
                raw[key] = tuple(raw[key])
        config = cls(
            sources=sources, preprocess=PreprocessConfig(**preprocess), augment=augment, **raw
        )
        config.check_ranges()
        return config

    def check_ranges(self) -> None:
        """Settings that would crash training (some only after hours) or train on nothing."""
        for key in ("epochs", "samples_per_epoch", "batch_size", "patience"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a whole number of at least 1, not {value!r}")
        if self.aggregator != "max" and (
            not isinstance(self.aggregator_epochs, int) or self.aggregator_epochs < 1
        ):
            raise ValueError(
                'aggregator_epochs must be at least 1 (0 only with aggregator = "max"), not '
                f"{self.aggregator_epochs!r}"
            )
        if not 0 < float(self.target_sensitivity) <= 1:
            raise ValueError(
                f"target_sensitivity must be above 0 and at most 1, not {self.target_sensitivity!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        return data


def _table(kind: Any, values: Any, name: str) -> dict[str, Any]:
    """One table of a training config as keyword arguments of ``kind``: unknown settings and
    missing required ones are refused by name, as the top level's are."""
    if not isinstance(values, dict):
        raise ValueError(f"{name}: a table of settings, not {values!r}")
    fields = kind.__dataclass_fields__
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown {name} settings: {', '.join(sorted(unknown))}")
    required = {
        n for n, f in fields.items() if f.default is MISSING and f.default_factory is MISSING
    }
    if required - set(values):
        raise ValueError(f"{name} needs {', '.join(sorted(required - set(values)))}")
    return dict(values)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Run:
    """The output folder of one training run: checkpoints, metrics, the split and the model."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.metrics_path = out_dir / "metrics.jsonl"
        self.metrics_path.write_text("")

    def log(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl: strict JSON, an AUC that cannot be computed (no positive
        of a class in the validation part) written as null, not as NaN."""
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def selection_score(val_mean_auc: float, val_loss: float) -> tuple[float, str]:
    """What early stopping and the best checkpoint follow: the mean validation slice AUC, or,
    where no class has both labels in the validation part (the AUC is NaN every epoch), the
    validation loss, lower being better."""
    if math.isfinite(val_mean_auc):
        return val_mean_auc, "val_mean_auc"
    return -val_loss, "val_loss"


def train(config: TrainConfig, *, progress: bool = True) -> Path:
    """Trains every part of a model package and writes it to ``out_dir/model.pt``."""
    device, run = _start(config)
    splits = _split(config, run)
    start, started_from = initial_members(config)
    members = [
        train_member(
            arch, splits["train"], splits["val"], config, run, device, progress, start.get(arch)
        )
        for arch in config.architectures
    ]
    # what follows is fitted on the networks as the package stores them
    members = [round_as_saved(m) for m in members]
    package = finish_package(config, splits, members, run, device)
    package.training["initialised_from"] = started_from
    return _save(package, run)


def refit_study_level(config: TrainConfig, members_from: Path) -> Path:
    """Keeps the slice networks of ``members_from`` as they are and fits everything after them
    again on the config's data and split: study aggregation, calibration, operating points, atlas.
    What ``train`` would give with those networks, without training them again: ``train`` fits
    all of it on the networks rounded as the package stores them, and their embeddings of the
    same studies come from the feature cache when it still holds them."""
    source = ModelPackage.load(members_from)
    found = [m.variant for m in source.members]
    if found != list(config.architectures):
        raise ValueError(
            f"{members_from} has members {', '.join(found)}, the config names "
            f"{', '.join(config.architectures)}"
        )
    if source.preprocess.to_dict() != config.preprocess.to_dict():
        raise ValueError(f"{members_from} was trained with other preprocessing than the config")
    device, run = _start(config)
    splits = _split(config, run)
    members = [m.to(device).eval() for m in source.members]
    package = finish_package(config, splits, members, run, device)
    package.training["initialised_from"] = source.training.get("initialised_from")
    package.training["members_from"] = f"{source.name} {source.version} ({members_from})"
    return _save(package, run)


def _start(config: TrainConfig) -> tuple[torch.device, Run]:
    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    run = Run(Path(config.out_dir))
    (run.dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    return pick_device(config.device), run


def _split(config: TrainConfig, run: Run) -> dict[str, list[Volume]]:
    splits = split_sources(config)
    (run.dir / "split.json").write_text(
        json.dumps({part: [v.key for v in volumes] for part, volumes in splits.items()}, indent=2)
    )
    return splits


def _save(package: ModelPackage, run: Run) -> Path:
    path = run.dir / "model.pt"
    package.save(path)
    return path


def finish_package(
    config: TrainConfig,
    splits: dict[str, list[Volume]],
    members: list[EfficientNetLite],
    run: Run,
    device: torch.device,
) -> ModelPackage:
    """Everything after the slice networks: study aggregation, calibration, operating points,
    atlas and the training record."""
    cache = FeatureCache.from_env()  # `--refit-study-level` reads them again
    features = {
        part: extract(members, volumes, config.preprocess, device, cache)
        for part, volumes in splits.items()
    }
    aggregator, aggregator_report = fit_aggregator(features, splits, config, run, device)
    package = ModelPackage(
        name=config.name,
        version=config.version,
        preprocess=config.preprocess,
        members=[m.cpu() for m in members],
        aggregator=aggregator.cpu() if aggregator is not None else None,
    )
    val_logits = study_logits(package, features["val"])
    val_labels = np.stack([v.study_labels for v in splits["val"]])
    package.calibration, package.thresholds, chosen_on = calibrate_and_choose(
        val_logits, val_labels, [v.source for v in splits["val"]], config
    )
    package.atlas = build_atlas(
        package, splits["train"], features["train"], per_class=config.atlas_per_class
    )
    package.training = training_summary(config, splits, aggregator_report, package, features)
    package.training["operating_points_on_validation"] = chosen_on
    run.log({"operating_points_on_validation": chosen_on})
    for line in describe_operating_points(chosen_on):
        tqdm.write(line)
    return package


def calibrate_and_choose(
    val_logits: np.ndarray, val_labels: np.ndarray, sources: list[str], config: TrainConfig
) -> tuple[np.ndarray, np.ndarray, dict[str, dict[str, float]]]:
    """Platt calibration and per-class operating points, both fitted on the validation studies
    of `operating_point_sources` (all of them when that is empty): the probabilities and the
    thresholds then describe the same kind of study. Fitting the calibration on a mixture (for
    example phantom series and single windowed roboflow pictures, which the model separates far
    worse) flattens it, and makes the phantom series' probabilities timid and wrong. The third
    value is what each threshold does on those studies (`operating_point_record`)."""
    chosen = [
        i
        for i, source in enumerate(sources)
        if not config.operating_point_sources or source in config.operating_point_sources
    ]
    if not chosen:
        raise ValueError(
            f"no validation study from {', '.join(config.operating_point_sources)} "
            "to choose the operating points on"
        )
    logits, labels = val_logits[chosen], val_labels[chosen]
    calibration = fit_platt(logits, labels)
    probabilities = platt(logits, calibration)
    thresholds = operating_points(probabilities, labels, config)
    return calibration, thresholds, operating_point_record(probabilities, labels, thresholds)


# Below this validation specificity a flag marks most negative studies: `ich train` warns.
LOW_SPECIFICITY = 0.5


def operating_point_record(
    probabilities: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray,
    *,
    gate_by_any: bool = True,
) -> dict[str, dict[str, float]]:
    """Per class, on the studies the thresholds were chosen on: the threshold, the share of
    positive studies at or above it (sensitivity), of negative ones below it (specificity), and
    how many of each there were. A threshold that reaches its sensitivity only by flagging most
    negative studies shows here, before any evaluation (docs/model-analysis.md)."""
    record = {}
    # As the package flags them: a subtype only together with "any" (``gate_by_any``; a strip
    # reader's fit, whose "any" column may not be the package's, records each class alone).
    flags = np.asarray(probabilities) >= np.asarray(thresholds)[None, :]
    if gate_by_any:
        flags[:, 1:] &= flags[:, :1]
    for i, name in enumerate(CLASSES):
        known = ~np.isnan(labels[:, i])
        positive = labels[known, i] == 1
        flagged = flags[known, i]
        record[name] = {
            "threshold": float(thresholds[i]),
            "sensitivity": float(flagged[positive].mean()) if positive.any() else float("nan"),
            "specificity": float((~flagged[~positive]).mean())
            if (~positive).any()
            else float("nan"),
            "positives": int(positive.sum()),
            "negatives": int((~positive).sum()),
            "gated_by_any": gate_by_any,  # older records scored each class alone
        }
    return record


def describe_operating_points(record: dict[str, dict[str, float]]) -> list[str]:
    """One line per class for the training log, and a warning for each flag that would mark
    most negative validation studies."""
    lines = []
    for name, r in record.items():
        lines.append(
            f"operating point {name}: threshold {r['threshold']:.3f}, validation sensitivity "
            f"{r['sensitivity']:.2f} ({r['positives']} positive), specificity "
            f"{r['specificity']:.2f} ({r['negatives']} negative)"
        )
        if r["specificity"] < LOW_SPECIFICITY:
            lines.append(
                f"WARNING: the {name} flag marks {1 - r['specificity']:.0%} of the negative "
                "validation studies; check the validation data before shipping this model"
            )
    return lines


def split_sources(config: TrainConfig) -> dict[str, list[Volume]]:
    """Each source is split by patient on its own, so every part sees every kind of data."""
    parts: dict[str, list[Volume]] = {"train": [], "val": [], "test": []}
    for source in config.sources:
        items = read_source(source)
        split = datasets.split_by_patient(items, fractions=config.split, seed=config.seed)
        total = sum(len(s) for s in split)
        bar = progress_bar(desc=f"prepare {source.kind}", unit="study", total=total)
        for part, chosen in zip(("train", "val", "test"), split, strict=True):
            parts[part].extend(prepare(chosen, config.preprocess, source.kind, progress=bar))
        bar.close()
    if not parts["train"] or not parts["val"]:
        raise ValueError("training needs data in both the training and validation parts")
    _refuse_shared_patients(parts)
    _need_labelled_validation_slices(parts["val"])
    return parts


def _need_labelled_validation_slices(volumes: list[Volume]) -> None:
    """Each epoch's networks are compared on labelled validation slices: without any, training
    would stop after its first epoch with an error from deep inside."""
    if not any((~np.isnan(v.slice_labels[:, 0])).any() for v in volumes):
        raise ValueError(
            "no validation study has slice labels: the networks are chosen on labelled "
            "validation slices (give a source with slice labels, or a larger validation part)"
        )


def _refuse_shared_patients(parts: dict[str, list[Volume]]) -> None:
    """Each source is split on its own, so a patient given by two sources (a set and a subset
    of it, two copies) could train in one and validate in the other: refuse that."""
    part_of: dict[str, str] = {}
    for part, volumes in parts.items():
        for volume in volumes:
            earlier = part_of.setdefault(volume.patient_id, part)
            if earlier != part:
                raise ValueError(
                    f"patient {datasets.pseudonym(volume.patient_id)} is in the {earlier} and "
                    f"the {part} parts: two sources give the same patient (each source is "
                    "split on its own); give each patient in one source only"
                )


def train_member(
    arch: str,
    train_volumes: list[Volume],
    val_volumes: list[Volume],
    config: TrainConfig,
    run: Run,
    device: torch.device,
    progress: bool,
    start: dict[str, torch.Tensor] | None = None,
) -> EfficientNetLite:
    seed_everything(config.seed)
    model = build_slice_model(
        arch,
        pretrained=config.pretrained and start is None,
        output_stride=config.output_stride,
    )
    if start is not None:
        model.load_state_dict(start)
    model = model.to(device)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(config.samples_per_epoch / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=steps_per_epoch * config.epochs, pct_start=0.15
    )
    sampler = SliceSampler(train_volumes, config.positive_fraction)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    best, best_score, stale = None, -math.inf, 0
    val_inputs = kept_validation_inputs(val_volumes, config.preprocess)
    for epoch in range(1, config.epochs + 1):
        started = time.monotonic()
        picks = sampler.sample(steps_per_epoch * config.batch_size, rng)
        model.train()
        losses = []
        bar = progress_bar(
            range(steps_per_epoch),
            desc=f"{arch} epoch {epoch}/{config.epochs}",
            unit="batch",
            enabled=progress,
        )
        for step in bar:
            batch = picks[step * config.batch_size : (step + 1) * config.batch_size]
            x, y, m = training_batch(train_volumes, batch, config, generator)
            features = model.forward_features(x.to(device))
            loss = masked_bce(model.forward_head(features), y.to(device))
            if config.localisation_weight > 0 and m.any():
                maps = model.forward_maps(features)
                loss = loss + config.localisation_weight * localisation_loss(
                    maps, m.to(device), y.to(device)
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        inputs = val_inputs or validation_inputs(val_volumes, config.preprocess)
        val = validate_slices(model, inputs, device)
        score = float(np.nanmean(list(val["auc"].values())))
        record = {
            "member": arch,
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_loss": val["loss"],
            "val_slice_auc": val["auc"],
            "val_mean_auc": score,
            "seconds": round(time.monotonic() - started, 1),
        }
        score, record["selected_by"] = selection_score(score, val["loss"])
        run.log(record)
        tqdm.write(
            f"{arch} epoch {epoch}: train loss {record['train_loss']:.3f}, "
            f"val loss {val['loss']:.3f}, val mean slice AUC {record['val_mean_auc']:.3f}"
        )
        torch.save(model.state_dict(), run.dir / "checkpoints" / f"{arch}-last.pt")
        if score > best_score:
            best_score, stale = score, 0
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            torch.save(best, run.dir / "checkpoints" / f"{arch}-best.pt")
        else:
            stale += 1
            if stale >= config.patience:
                tqdm.write(f"{arch}: early stop after epoch {epoch} (no gain for {stale} epochs)")
                break
    if best is not None:
        model.load_state_dict(best)
    return model.eval()


def initial_members(
    config: TrainConfig,
) -> tuple[dict[str, dict[str, torch.Tensor]], str | None]:
    """The weights each architecture starts from when ``init_from`` names a package, and that
    package's name and version."""
    if not config.init_from:
        return {}, None
    package = ModelPackage.load(Path(config.init_from))
    found = {m.variant: m for m in package.members}
    missing = [arch for arch in config.architectures if arch not in found]
    if missing:
        raise ValueError(
            f"{config.init_from} has no {', '.join(missing)} member to start from "
            f"(it has {', '.join(found) or 'none'})"
        )
    weights = {arch: found[arch].state_dict() for arch in config.architectures}
    return weights, f"{package.name} {package.version}"


def training_batch(
    volumes: list[Volume], picks: np.ndarray, config: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (B, 3, S, S), labels (B, 6) and per-class bleed outlines (B, 6, S, S) bool (all
    False where the slice has none)."""
    inputs, labels, outlines = [], [], []
    for v, s in picks:
        x, mask = slice_input(volumes[v], int(s), config.preprocess, config.augment, generator)
        inputs.append(x)
        labels.append(torch.from_numpy(volumes[v].slice_labels[s]))
        outlines.append(class_outlines(mask, x.shape[-1]))
    return torch.stack(inputs), torch.stack(labels), torch.stack(outlines)


def class_outlines(mask: np.ndarray | None, size: int) -> torch.Tensor:
    """Bit-flag mask (S, S) in SUBTYPES order -> (6, S, S) bool; "any" is their union."""
    if mask is None:
        return torch.zeros(len(CLASSES), size, size, dtype=torch.bool)
    bits = torch.from_numpy(mask.astype(np.int64))
    planes = [(bits >> i) & 1 for i in range(len(CLASSES) - 1)]
    subtypes = torch.stack(planes).bool()
    return torch.cat([subtypes.any(0, keepdim=True), subtypes])


def localisation_loss(
    maps: torch.Tensor, outlines: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Where a positive slice's bleed is outlined: minus the log of the share of a spatial
    softmax of the class's evidence map that falls on locations near the bleed.

    Shift-invariant (a softmax), so it shapes where the evidence lies without fighting the
    classification loss over how much there is. ``near_bleed`` says which locations count.
    """
    cells, valid = near_bleed(outlines, labels, *maps.shape[-2:])
    if not valid.any():
        return maps.sum() * 0.0
    return localisation_nll(maps.flatten(2), cells)[valid].mean()


def near_bleed(
    outlines: torch.Tensor, labels: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class outlines (B, 6, S, S) and labels (B, 6) -> which of the (h, w) locations of a
    stride-S/w stage are near the bleed (B, 6, h*w) float, and which (slice, class) pairs have
    such a location on a positive slice (B, 6) bool.

    Feature i of a stride-s stage is centred on input pixel s * i; a location is near when the
    bleed comes within s/4 pixels of that centre (where the attention peak must land), or, for
    a bleed too small for that, within its cell.
    """
    stride = outlines.shape[-1] // width

    def near(radius: int) -> torch.Tensor:
        return F.max_pool2d(
            outlines.float(), kernel_size=2 * radius + 1, stride=stride, padding=radius
        )[..., :height, :width].flatten(2)  # (B, 6, h*w)

    close, touching = near(max(stride // 4, 1)), near(stride // 2)
    cells = torch.where(close.amax(-1, keepdim=True) > 0, close, touching)
    valid = (torch.nan_to_num(labels) == 1) & (cells.amax(-1) > 0)
    return cells, valid


def localisation_nll(maps: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Evidence maps (B, 6, L) over L locations and the locations near the bleed (B, 6, L) ->
    minus the log of the softmax share near the bleed, (B, 6) (infinite where none is)."""
    log_share = F.log_softmax(maps.float(), dim=-1)
    return -torch.logsumexp(log_share.masked_fill(cells == 0, -math.inf), dim=-1)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Weighted binary cross-entropy over the known labels only (NaN = unknown)."""
    known = ~torch.isnan(labels)
    target = torch.nan_to_num(labels)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    weights = CLASS_WEIGHTS.to(logits.device) * known
    return (loss * weights).sum() / weights.sum().clamp_min(1.0)


@torch.no_grad()
def volume_inputs(volume: Volume, config: PreprocessConfig) -> torch.Tensor:
    """Every slice of a volume as network input, no augmentation: (N, 3, S, S)."""
    return torch.stack([slice_input(volume, i, config, None)[0] for i in range(len(volume.hu))])


# The validation slices' inputs are kept between epochs when they take no more than this.
VALIDATION_INPUTS_MAX_BYTES = 1 << 30


@torch.no_grad()
def validation_inputs(
    volumes: list[Volume], config: PreprocessConfig
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Each validation volume's labelled slices as network input (no augmentation) with their
    labels."""
    for volume in volumes:
        known = ~np.isnan(volume.slice_labels[:, 0])
        if known.any():
            yield volume_inputs(volume, config)[torch.from_numpy(known)], volume.slice_labels[known]


def kept_validation_inputs(
    volumes: list[Volume], config: PreprocessConfig
) -> list[tuple[torch.Tensor, np.ndarray]] | None:
    """The validation inputs computed once for every epoch, or None where they would take more
    than VALIDATION_INPUTS_MAX_BYTES (then each epoch computes them again)."""
    size = config.image_size**2 * len(config.windows) * 4  # float32 bytes per slice
    labelled = sum(int((~np.isnan(v.slice_labels[:, 0])).sum()) for v in volumes)
    if labelled * size > VALIDATION_INPUTS_MAX_BYTES:
        return None
    return list(validation_inputs(volumes, config))


@torch.no_grad()
def validate_slices(
    model: EfficientNetLite,
    inputs: Iterable[tuple[torch.Tensor, np.ndarray]],
    device: torch.device,
) -> dict[str, Any]:
    """Slice-level validation loss and AUC per class over ``inputs`` (``validation_inputs``, or
    those ``kept_validation_inputs`` keeps for every epoch)."""
    model.eval()
    net = folded_for_inference(model)  # what the predictor runs, and about 1.2 times faster
    logits, labels = [], []
    for x, known_labels in inputs:
        for chunk in torch.split(x, 64):
            logits.append(net(chunk.to(device)).float().cpu())
        labels.append(torch.from_numpy(known_labels))
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    auc = {}
    for i, name in enumerate(CLASSES):
        known = ~torch.isnan(all_labels[:, i])
        auc[name] = roc_auc(all_labels[known, i].numpy(), all_logits[known, i].numpy())
    return {"loss": float(masked_bce(all_logits, all_labels)), "auc": auc}


@dataclass
class VolumeFeatures:
    logits: torch.Tensor  # (M, N, 6) slice logits per member
    embeddings: torch.Tensor  # (M, N, E) pooled last-stage features per member


@torch.no_grad()
def extract(
    members: list[EfficientNetLite],
    volumes: list[Volume],
    config: PreprocessConfig,
    device: torch.device,
    cache: FeatureCache | None = None,
) -> list[VolumeFeatures]:
    """Every member's slice logits and embeddings per volume, from copies of the members with
    their batch norms folded (what the predictor runs). With ``cache``, a volume it has seen
    through the same networks is read from there instead (``feature_cache``)."""
    networks = [folded_for_inference(m) for m in members]
    fingerprint = networks_fingerprint(members, device) if cache is not None else None
    out = []
    for volume in progress_bar(volumes, desc="slice features", unit="study"):
        logits, embeddings = member_outputs(
            networks,
            volume_inputs(volume, config),
            device,
            batch_size=64,
            cache=cache,
            fingerprint=fingerprint,
            mixed_precision=False,  # the study level is fitted on float32 embeddings
        )
        out.append(VolumeFeatures(logits=logits, embeddings=embeddings))
    return out


def max_study_logits(features: list[VolumeFeatures]) -> np.ndarray:
    """The plain baseline: the ensemble's mean slice logit, maximum over slices."""
    return np.stack([f.logits.mean(0).amax(0).numpy() for f in features])


def study_logits(package: ModelPackage, features: list[VolumeFeatures]) -> np.ndarray:
    if package.aggregator is None:
        return max_study_logits(features)
    with torch.no_grad():
        rows = []
        for f in features:
            x = aggregator_features(f.logits, f.embeddings)[None]  # (1, N, F)
            mask = torch.ones(x.shape[:2], dtype=torch.bool)
            rows.append(package.aggregator(x, mask)[0][0].numpy())
    return np.stack(rows)


def fit_aggregator(
    features: dict[str, list[VolumeFeatures]],
    splits: dict[str, list[Volume]],
    config: TrainConfig,
    run: Run,
    device: torch.device,
) -> tuple[StudyAggregator | None, dict[str, Any]]:
    """Trains the sequence model and keeps it only if it beats max-pooling on validation
    (aggregator "auto"), or as asked ("gru"). With "max" no sequence model is trained: the
    report then holds max-pooling's validation AUC alone."""
    seed_everything(config.seed)
    val_f = features["val"]
    val_labels = np.stack([v.study_labels for v in splits["val"]])
    # Compared on the validation studies of more than one slice: a single windowed picture is
    # no series to aggregate, and its score would decide between two study-level methods.
    series = [i for i, f in enumerate(val_f) if f.logits.shape[1] > 1] or list(range(len(val_f)))
    compared = [val_f[i] for i in series]
    aucs = {"max": _mean_auc(max_study_logits(compared), val_labels[series])}
    aggregator, epochs, choice = None, 0, "max"
    if config.aggregator != "max":
        aggregator, epochs = _train_sequence_model(features, splits, config, val_labels)
        aucs = {
            "gru": _mean_auc(
                np.stack([_aggregate(aggregator, f)[0][0].detach().numpy() for f in compared]),
                val_labels[series],
            ),
            **aucs,
        }
        choice = "gru" if config.aggregator == "gru" or aucs["gru"] >= aucs["max"] else "max"
    report = {
        "val_mean_study_auc": aucs,
        "compared_on": len(series),
        "chosen": choice,
        "epochs": epochs,
    }
    run.log({"aggregator": report})
    compared_text = ", ".join(f"{name} {auc:.3f}" for name, auc in aucs.items())
    tqdm.write(f"study aggregation, mean validation AUC: {compared_text} -> {choice}")
    del device
    return (aggregator if choice == "gru" else None), report


def _train_sequence_model(
    features: dict[str, list[VolumeFeatures]],
    splits: dict[str, list[Volume]],
    config: TrainConfig,
    val_labels: np.ndarray,
) -> tuple[StudyAggregator, int]:
    """The GRU over slice features, trained with early stopping on the validation loss; and
    the number of epochs it ran."""
    train_f, val_f = features["train"], features["val"]
    dim = aggregator_features(train_f[0].logits, train_f[0].embeddings).shape[-1]
    aggregator = StudyAggregator(AggregatorConfig(input_dim=dim))
    optimiser = torch.optim.AdamW(aggregator.parameters(), lr=2e-3, weight_decay=1e-3)
    best, best_loss, stale = None, math.inf, 0
    for epoch in range(config.aggregator_epochs):
        aggregator.train()
        for i in np.random.default_rng(config.seed + epoch).permutation(len(train_f)):
            study, slices = _aggregate(aggregator, train_f[i])
            volume = splits["train"][i]
            loss = masked_bce(study, torch.from_numpy(volume.study_labels)[None])
            loss = loss + 0.5 * masked_bce(slices, torch.from_numpy(volume.slice_labels))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        aggregator.eval()
        with torch.no_grad():
            val_logits = torch.stack([_aggregate(aggregator, f)[0][0] for f in val_f])
        val_loss = float(masked_bce(val_logits, torch.from_numpy(val_labels)))
        if val_loss < best_loss - 1e-4:
            best_loss, stale = val_loss, 0
            best = {k: v.clone() for k, v in aggregator.state_dict().items()}
        else:
            stale += 1
            if stale >= 10:
                break
    if best is not None:
        aggregator.load_state_dict(best)
    return aggregator.eval(), epoch + 1


def _aggregate(aggregator: StudyAggregator, f: VolumeFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    x = aggregator_features(f.logits, f.embeddings)[None]  # (1, N, F)
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    study, slices = aggregator(x, mask)
    return study, slices[0]


def class_aucs(logits: np.ndarray, labels: np.ndarray) -> list[float]:
    """Study AUC per class over the studies whose label for that class is known."""
    return [
        roc_auc(labels[~np.isnan(labels[:, i]), i], logits[~np.isnan(labels[:, i]), i])
        for i in range(len(CLASSES))
    ]


def mean_of(values: list[float]) -> float:
    return float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")


def _mean_auc(logits: np.ndarray, labels: np.ndarray) -> float:
    return mean_of(class_aucs(logits, labels))


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class (a, b) minimising log-loss of sigmoid(a * logit + b) on validation data."""
    params = np.tile([1.0, 0.0], (len(CLASSES), 1))
    for i in range(len(CLASSES)):
        known = ~np.isnan(labels[:, i])
        y = labels[known, i]
        if len(np.unique(y)) < 2:
            continue
        params[i] = _platt_one(logits[known, i], y)
    return params


def _platt_one(logits: np.ndarray, labels: np.ndarray) -> list[float]:
    x = torch.tensor(logits, dtype=torch.float64)
    target = torch.tensor(labels, dtype=torch.float64)
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([ab], lr=0.5, max_iter=100)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(ab[0] * x + ab[1], target)
        loss = loss + 1e-3 * (ab[0] - 1) ** 2  # keep the slope sane on tiny sets
        loss.backward()
        return loss

    optimiser.step(closure)
    a, b = (float(v) for v in ab.detach().numpy())
    if not (0.05 <= a <= 20 and abs(b) <= 20):
        # A validation set too small or too odd to calibrate on would flatten or invert the
        # ranking: keep the plain sigmoid instead.
        return [1.0, 0.0]
    return [a, b]


def operating_points(
    probabilities: np.ndarray, labels: np.ndarray, config: TrainConfig
) -> np.ndarray:
    thresholds = np.full(len(CLASSES), 0.5)
    for i in range(len(CLASSES)):
        known = ~np.isnan(labels[:, i])
        thresholds[i] = threshold_for_sensitivity(
            labels[known, i] == 1, probabilities[known, i], config.target_sensitivity
        )
    return thresholds


def training_summary(
    config: TrainConfig,
    splits: dict[str, list[Volume]],
    aggregator_report: dict[str, Any],
    package: ModelPackage,
    features: dict[str, list[VolumeFeatures]],
) -> dict[str, Any]:
    test_logits = study_logits(package, features["test"]) if features["test"] else np.zeros((0, 6))
    test_labels = (
        np.stack([v.study_labels for v in splits["test"]]) if splits["test"] else np.zeros((0, 6))
    )
    test_auc = {}
    for i, name in enumerate(CLASSES):
        known = ~np.isnan(test_labels[:, i]) if len(test_labels) else np.zeros(0, bool)
        test_auc[name] = (
            roc_auc(test_labels[known, i], test_logits[known, i]) if known.any() else float("nan")
        )
    return {
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
        "counts": {part: len(v) for part, v in splits.items()},
        "sources": sorted({v.source for part in splits.values() for v in part}),
        "aggregator": aggregator_report,
        # the sources whose validation studies the calibration was fitted on (empty: all)
        "calibrated_on": list(config.operating_point_sources),
        "internal_test_study_auc": test_auc,
        # pseudonyms of the items' keys (datasets.pseudonym): no folder name or UID in a package
        "split": {
            part: [datasets.pseudonym(v.key) for v in volumes] for part, volumes in splits.items()
        },
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": str(torch.__version__),
    }
