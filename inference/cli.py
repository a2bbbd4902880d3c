"""The `ich` command: phantom, train, refit-heads, convexity, evaluate, card, predict, atlas
build."""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from inference.constants import CLASSES, SIZES

DATA_KINDS = ("phantom", "study_folder", "cq500", "rsna", "yolo", "image_folder")
SERIES_KINDS = ("phantom", "study_folder", "cq500", "rsna")


def main(argv: list[str] | None = None) -> int:
    if (argv or sys.argv[1:])[:1] == ["phantom"]:
        # One BLAS thread: the generator's many small products are slower when threads fight.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(
        prog="ich",
        description="Explainable ICH detection on head CT. Triage support, not diagnosis.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    phantom = commands.add_parser("phantom", help="write synthetic head CT studies as DICOM")
    phantom.add_argument("--out", type=Path, required=True)
    phantom.add_argument("--studies", type=int, default=20)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument(
        "--favour",
        default="",
        metavar="SUBTYPE,...",
        help="subtypes a positive study draws with three times the weight (default: all alike)",
    )
    phantom.add_argument(
        "--extra-axial",
        choices=("classic", "typical"),
        default="classic",
        help="subdural and epidural shapes: classic (the shipped model's sets) or typical "
        "(pointed epidural lenses, thin long subdural crescents)",
    )
    phantom.add_argument(
        "--min-size",
        choices=SIZES,
        default="tiny",
        help="smallest bleed size a positive study may have; a smaller draw becomes this size "
        "(default tiny: every size, from under 5 mL)",
    )
    phantom.add_argument(
        "--max-size",
        choices=SIZES,
        default="large",
        help="largest bleed size a positive study may have; a larger draw becomes this size "
        "(default large: every size)",
    )
    phantom.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1,
        help="studies generated at once, one process each (default: every core); the files are"
        " the same whatever the number",
    )
    phantom.set_defaults(run=_phantom)

    train = commands.add_parser("train", help="train a model package from a TOML config")
    train.add_argument("--config", type=Path, required=True)
    train.add_argument("--out", type=Path, help="output folder (overrides out_dir)")
    train.add_argument(
        "--init-from",
        type=Path,
        help="model package whose members start this run (overrides init_from)",
    )
    train.add_argument(
        "--refit-study-level",
        type=Path,
        metavar="MODEL",
        help="keep MODEL's slice networks; fit only study aggregation, calibration, "
        "operating points and atlas again on the config's data",
    )
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="measure a model on a dataset")
    evaluate.add_argument("model", type=Path)
    evaluate.add_argument("dataset", type=Path)
    evaluate.add_argument("--kind", choices=DATA_KINDS, default="study_folder")
    evaluate.add_argument("--labels", help="labels CSV for --kind image_folder")
    evaluate.add_argument("--out", type=Path, default=Path("evaluation"))
    evaluate.add_argument(
        "--include-training",
        action="store_true",
        help="also score items the model was trained or validated on",
    )
    evaluate.add_argument("--bootstrap", type=_positive_int, default=1000)
    evaluate.add_argument("--title", help="how the model card names this data set")
    evaluate.add_argument("--note", help="a sentence for the model card about this data set")
    evaluate.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="MODEL:OUT",
        help="another package with the same networks (from `ich refit-heads`), scored from the"
        " same network pass; its report goes to OUT (repeatable)",
    )
    evaluate.set_defaults(run=_evaluate)

    card = commands.add_parser("card", help="write one model card from several evaluation reports")
    card.add_argument("model", type=Path)
    card.add_argument("reports", nargs="+", type=Path, help="report.json files from `ich evaluate`")
    card.add_argument("--out", type=Path, required=True, help="the Markdown file to write")
    card.set_defaults(run=_card)

    predict = commands.add_parser("predict", help="score one series (a folder or files)")
    predict.add_argument("paths", nargs="+", type=Path)
    predict.add_argument("--model", type=Path, help="model package (default: the shipped one)")
    predict.add_argument("--heatmaps", type=Path, help="write heatmap overlays as PNG here")
    predict.add_argument(
        "--device",
        type=_device_name,
        metavar="cpu|cuda|cuda:N",
        help="default: cuda when present, else cpu",
    )
    predict.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip files that are not part of a readable CT series (listed on stderr)",
    )
    predict.set_defaults(run=_predict)

    heads = commands.add_parser(
        "refit-heads",
        help="fit one linear head over the ensemble's embeddings on fresh labelled studies",
    )
    heads.add_argument("model", type=Path, help="model package whose networks stay as they are")
    heads.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="KIND:PATH",
        help="studies with slice labels the networks never trained on (phantom output); repeatable",
    )
    heads.add_argument("--out", type=Path, required=True, help="the model package to write")
    heads.add_argument("--version", required=True, help="version of the new package")
    heads.add_argument("--folds", type=_at_least_2, default=5)
    heads.add_argument(
        "--l2",
        type=float,
        action="append",
        help="L2 weight to cross-validate; repeatable (default: 0.001, 0.01 and 0.1)",
    )
    heads.add_argument("--seed", type=int, default=0)
    heads.add_argument("--threads", type=_non_negative_int, default=0, help="0: every core")
    heads.add_argument(
        "--attention-weight",
        type=float,
        action="append",
        help="weight of the localisation term that keeps each class's Grad-CAM on the bleed"
        " (default 0: AUC only, as 6.2.0; training uses 0.5); needs studies with masks;"
        " repeatable: every weight is cross-validated from one pass of the networks",
    )
    heads.add_argument(
        "--max-attention-drop",
        type=float,
        default=0.05,
        help="the setting chosen must put each class's Grad-CAM peak near the bleed, out of"
        " fold, at most this much less often than the members' own heads (default 0.05)",
    )
    heads.add_argument(
        "--attention-slices",
        type=int,
        default=60,
        help="outlined bleed slices drawn per class for that term (default 60)",
    )
    heads.set_defaults(run=_refit_heads)

    convexity = commands.add_parser(
        "convexity",
        help="train the strip network that reads blood along the inner table (extra-axial, and"
        " sulcal when asked) and join its evidence to the model's scores of those classes and any",
    )
    convexity.add_argument("model", type=Path, help="model package whose ensemble stays as it is")
    convexity.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="phantom:PATH",
        help="studies with blood masks the strip network trains on; repeatable (or --net-from)",
    )
    convexity.add_argument(
        "--net-from",
        metavar="PACKAGE:SLOT",
        help="take the trained strip network of that package's reader (convexity, sulcal,"
        " crescent or lens) instead of training one: only its fusion and operating points"
        " are fitted",
    )
    convexity.add_argument(
        "--fit",
        action="append",
        required=True,
        metavar="KIND:PATH",
        help="labelled studies neither network trained on, where the fusion and the fused"
        " classes' operating points are fitted (out of fold); repeatable",
    )
    convexity.add_argument("--out", type=Path, required=True, help="the model package to write")
    convexity.add_argument("--version", required=True, help="version of the new package")
    convexity.add_argument("--epochs", type=_positive_int, help="default 6")
    convexity.add_argument("--steps", type=_positive_int, help="batches per epoch (default 150)")
    convexity.add_argument("--batch", type=_positive_int, help="default 32")
    convexity.add_argument("--lr", type=float, help="default 2e-3")
    convexity.add_argument(
        "--width", type=_positive_int, help="channels of the first stage (default 16)"
    )
    convexity.add_argument("--seed", type=int, default=0)
    convexity.add_argument("--threads", type=_non_negative_int, default=0, help="0: every core")
    convexity.add_argument(
        "--classes",
        metavar="CLASS,...",
        help="what the strips read: subdural, epidural and/or subarachnoid (sulcal blood near"
        " the convexity); default subdural,epidural, or those of the --net-from network",
    )
    convexity.add_argument(
        "--reader",
        choices=("convexity", "sulcal", "crescent", "lens"),
        default="convexity",
        help="convexity (default): the package's first strip reader; sulcal, crescent, lens:"
        " another strip network, fused only for the classes in --fuse. No two readers fuse the same"
        " class, so the other readers' classes keep their scores and operating points",
    )
    convexity.add_argument(
        "--fuse",
        metavar="CLASS,...",
        help="the classes whose scores the new reader may join (default: for convexity every"
        " class it has evidence for, any included; for the others the classes it reads)",
    )
    convexity.add_argument(
        "--cross",
        action="store_true",
        help="each fused class also reads the ensemble's own logits of the other five classes"
        " (a cross-class fusion: another bleed's evidence can explain away what looks like it)",
    )
    convexity.add_argument(
        "--floor",
        action="store_true",
        help="each fused class reads the ensemble's logit with a floor under it, fitted with the"
        " fusion: below it, how sure the ensemble is that a study is normal stops counting",
    )
    convexity.add_argument(
        "--either",
        action="store_true",
        help="fuse in the either form: the larger of the ensemble's and the strips' own"
        " calibrated logits, recalibrated, for a class the two see in different places",
    )
    convexity.set_defaults(run=_convexity)

    atlas = commands.add_parser("atlas", help="prediction-basis atlas")
    atlas_commands = atlas.add_subparsers(dest="atlas_command", required=True)
    build = atlas_commands.add_parser("build", help="rebuild a model's atlas from training data")
    build.add_argument("--model", type=Path, required=True)
    build.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="KIND:PATH",
        help=f"training data, KIND one of {', '.join(DATA_KINDS)}; repeatable. Only the items"
        " the model trained on are used (its recorded training split)",
    )
    build.add_argument("--labels", type=Path, help="labels CSV for an image_folder --data")
    build.add_argument("--per-class", type=_positive_int, default=12)
    build.add_argument("--out", type=Path, help="where to write the model (default: in place)")
    build.set_defaults(run=_atlas_build)

    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as error:  # bad input, a missing or unwritable file
        print(f"ich: error: {error}", file=sys.stderr)
        return 2


def _phantom(args: argparse.Namespace) -> None:
    from inference.phantom import write_dataset

    favour = [s.strip() for s in args.favour.split(",") if s.strip()]
    write_dataset(
        args.out,
        args.studies,
        args.seed,
        favour=favour,
        extra_axial=args.extra_axial,
        min_size=args.min_size,
        max_size=args.max_size,
        workers=args.workers,
    )
    print(f"wrote {args.studies} phantom studies to {args.out}")


def _train(args: argparse.Namespace) -> None:
    from inference.training import TrainConfig, refit_study_level, train

    config = TrainConfig.from_toml(args.config)
    if args.out:
        config.out_dir = str(args.out)
    if args.init_from:
        config.init_from = str(args.init_from)
    if args.refit_study_level:
        path = refit_study_level(config, args.refit_study_level)
    else:
        path = train(config)
    print(f"model written to {path}")


def _evaluate(args: argparse.Namespace) -> None:
    from inference.data import DataSource
    from inference.evaluation import evaluate

    source = DataSource(kind=args.kind, path=str(args.dataset), labels_csv=args.labels)
    also = []
    for spec in args.also:
        model, sep, out = spec.rpartition(":")
        if not sep or not model or not out:
            raise ValueError(f"--also {spec}: expected MODEL:OUT")
        also.append((Path(model), Path(out)))
    report = evaluate(
        args.model,
        source,
        args.out,
        exclude_training=not args.include_training,
        bootstrap_rounds=args.bootstrap,
        title=args.title,
        note=args.note,
        also=also,
    )
    summary = {c: report["study_level"][c]["auc"] for c in CLASSES}
    print(json.dumps({"study_auc": summary, "report": str(args.out / "report.json")}, indent=2))


def _card(args: argparse.Namespace) -> None:
    from inference.evaluation import model_card
    from inference.predictor import Predictor

    reports = [_evaluation_report(path) for path in args.reports]
    predictor = Predictor.load(args.model)
    for path, report in zip(args.reports, reports, strict=True):
        measured = report["model"]
        if not isinstance(measured, dict) or (measured.get("name"), measured.get("version")) != (
            predictor.name,
            predictor.version,
        ):
            name = measured.get("name") if isinstance(measured, dict) else measured
            version = measured.get("version") if isinstance(measured, dict) else ""
            raise ValueError(
                f"{path}: measured on {name} {version}, not on {predictor.name} "
                f"{predictor.version}: a card shows only its own model's figures"
            )
    args.out.write_text(model_card(predictor, reports))
    print(f"model card written to {args.out}")


REPORT_KEYS = ("model", "dataset", "study_level", "pointing_game", "per_item")


def _evaluation_report(path: Path) -> dict[str, Any]:
    """A report.json of `ich evaluate`, or a ValueError naming the file and what is wrong."""
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    missing = [k for k in REPORT_KEYS if not isinstance(report, dict) or k not in report]
    if missing:
        raise ValueError(f"{path}: not a report of `ich evaluate` (no {', '.join(missing)})")
    return report


def _at_least_2(value: str) -> int:
    number = _positive_int(value)
    if number < 2:
        raise argparse.ArgumentTypeError(f"{value!r}: at least 2")
    return number


def _non_negative_int(value: str) -> int:
    if value.strip() == "0":
        return 0
    return _positive_int(value)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a whole number of at least 1")
    return number


def _device_name(value: str) -> str:
    """cpu, cuda or cuda:N, as torch names them."""
    kind, _, index = value.partition(":")
    if value == "cpu" or (kind == "cuda" and (not index or index.isdigit())):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: cpu, cuda or cuda:N")


def _predict(args: argparse.Namespace) -> None:
    from inference.dicom_io import (
        DicomInputError,
        EmptySeriesError,
        TooManySlicesError,
        load_series,
    )
    from inference.predictor import Predictor

    if args.heatmaps is not None:  # before the model loads and the study is read
        if args.heatmaps.exists() and not args.heatmaps.is_dir():
            raise ValueError(f"--heatmaps {args.heatmaps}: a file, not a folder")
        try:
            args.heatmaps.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise ValueError(f"--heatmaps {args.heatmaps}: cannot be made ({reason})") from None
        if not os.access(args.heatmaps, os.W_OK):
            raise ValueError(f"--heatmaps {args.heatmaps}: not writable")
    for path in args.paths:
        if not path.exists():
            raise ValueError(f"{path}: no such file or folder")
    several = len(args.paths) > 1 or args.paths[0].is_dir()
    predictor = Predictor.load(args.model, device=args.device)
    started = time.perf_counter()
    try:
        series = load_series(
            args.paths[0] if len(args.paths) == 1 else args.paths, skip_bad=args.skip_bad
        )
    except (EmptySeriesError, TooManySlicesError):
        raise
    except DicomInputError as error:  # one file of several: say how to read the rest
        if args.skip_bad or not several:
            raise
        raise ValueError(f"{error} (--skip-bad reads the series without such files)") from None
    read_s = time.perf_counter() - started
    for skipped in series.skipped:
        print(f"skipped {skipped.source}: {skipped.reason}", file=sys.stderr)
    prediction = predictor.predict(series, heatmaps=args.heatmaps is not None)
    prediction.timings = {"read": read_s, **prediction.timings}
    prediction.timings["total"] += read_s
    if args.heatmaps:  # first, so that printed JSON means everything asked for was done
        _write_overlays(prediction, series, args.heatmaps)
    print(json.dumps(prediction.summary(), indent=2))


def _write_overlays(prediction: Any, series: Any, out: Path) -> None:
    import numpy as np
    from PIL import Image

    from inference.preprocess import BRAIN

    out.mkdir(parents=True, exist_ok=True)
    if not prediction.heatmaps:
        print("no flagged finding: no heatmap overlays written", file=sys.stderr)
    for name, heatmap in prediction.heatmaps.items():
        s = prediction.key_slices[name]
        gray = np.clip((series.hu[s] - BRAIN.low) / BRAIN.width, 0, 1)
        heat = heatmap[s].astype(np.float32) / 255
        rgb = np.stack([gray, gray, gray], axis=-1)
        colour = np.stack([heat, heat * 0.3, np.zeros_like(heat)], axis=-1)
        alpha = 0.5 * heat[..., None]
        overlay = (rgb * (1 - alpha) + colour * alpha) * 255
        path = out / f"{name}_slice{s:03d}.png"
        Image.fromarray(overlay.astype(np.uint8)).save(path)
        print(f"heatmap overlay: {path}", file=sys.stderr)


def _atlas_build(args: argparse.Namespace) -> None:
    from inference.atlas import build_atlas
    from inference.data import DataSource, prepare, read_source
    from inference.datasets import item_key, pseudonym, recorded
    from inference.package import ModelPackage
    from inference.training import extract

    package = ModelPackage.load(args.model)
    trained_on = recorded(package.training.get("split", {}).get("train", []))
    volumes = []
    for spec in args.data:
        kind, path = _data_spec(spec)
        labels = str(args.labels) if kind == "image_folder" and args.labels else None
        if kind == "image_folder" and labels is None:
            raise ValueError(f"{spec}: an image_folder needs --labels CSV")
        items = read_source(DataSource(kind=kind, path=path, labels_csv=labels))
        if trained_on:  # the atlas shows training slices only: never a validation or test one
            kept = [i for i in items if pseudonym(item_key(i)) in trained_on]
            print(f"{path}: {len(kept)} of {len(items)} items are in the model's training split")
            items = kept
        else:
            print(f"{args.model} records no training split: every item of {path} is used")
        volumes += prepare(items, package.preprocess, kind)
    if not volumes:
        raise ValueError("none of the --data items is in the model's training split")
    cache = _feature_cache()
    features = extract(package.members, volumes, package.preprocess, device=_cpu(), cache=cache)
    _report_cache(cache)
    package.atlas = build_atlas(package, volumes, features, per_class=args.per_class)
    if package.atlas is None:
        raise ValueError("the model gets no positive training slice right: no atlas to build")
    target = args.out or args.model
    package.save(target)
    print(f"atlas of {len(package.atlas.classes)} slices written into {target}")


def _check_out_folder(out: Path, model: Path) -> None:
    """Before any work: --out is a folder the new package's model.pt can go in, and not the
    package being built on (which would be overwritten)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder")
    if (out / "model.pt").resolve() == Path(model).resolve():
        raise ValueError(f"--out {out}: would overwrite {model}, the package it builds on")


def _convexity(args: argparse.Namespace) -> None:
    import torch

    from inference.convexity import EXTRA_AXIAL, check_classes
    from inference.convexity_fit import SLOTS, add_convexity, check_slot
    from inference.datasets import item_key, pseudonym, recorded
    from inference.package import ModelPackage

    _check_out_folder(args.out, args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.train) == bool(args.net_from):
        raise ValueError("give the studies to train a strip network on (--train) or --net-from")
    # training settings not given keep train_net's defaults
    settings = {
        k: v
        for k in ("epochs", "steps", "batch", "lr", "width")
        if (v := getattr(args, k)) is not None
    }
    if args.net_from and settings:
        raise ValueError(
            f"--net-from takes a trained network: --{', --'.join(settings)} would train one"
        )
    source = None if args.net_from is None else _net_source(args.net_from, SLOTS)
    classes = tuple(c.strip() for c in (args.classes or "").split(",") if c.strip())
    if source is not None:
        if classes and set(classes) != set(source.reader.net.classes):
            raise ValueError(
                f"--net-from {args.net_from} reads {','.join(source.reader.net.classes)},"
                f" not {','.join(classes)}"
            )
        classes = source.reader.net.classes
    check_classes(classes or EXTRA_AXIAL)
    classes = classes or EXTRA_AXIAL
    fuse = None if args.fuse is None else tuple(c.strip() for c in args.fuse.split(","))
    if fuse is None and args.reader != SLOTS[0]:
        fuse = classes
    package = ModelPackage.load(args.model)
    check_slot(package, args.reader, fuse, classes)
    # The strip readers' studies may be used again (a reader the package has is replaced; a
    # later reader fuses classes the others do not); those of the ensemble may not.
    seen = recorded(
        k
        for part, keys in package.training.get("split", {}).items()
        if part not in SLOTS
        for k in keys
    )
    train_items = _fresh_studies(args.train, seen, args.model, kinds=("phantom",))
    fit_items = _fresh_studies(args.fit, seen, args.model, kinds=SERIES_KINDS)
    trained = (
        {pseudonym(item_key(i)) for i in train_items}
        if source is None
        else recorded(source.train_keys)
    )
    if source is not None and trained & seen:
        raise ValueError(
            f"the network of --net-from {args.net_from} trained on {len(trained & seen)}"
            f" studies of {args.model}'s ensemble"
        )
    shared = sorted(k for k in map(item_key, fit_items) if pseudonym(k) in trained)
    if shared:
        raise ValueError(
            f"{len(shared)} studies of --fit are studies the strip network trains on"
            f" (first {shared[0]})"
        )
    cache = _feature_cache()
    record = add_convexity(
        package,
        train_items,
        fit_items,
        version=args.version,
        data={
            "train": list(args.train),
            "fit": list(args.fit),
            **({"net_from": args.net_from} if source else {}),
        },
        workers=args.threads or os.cpu_count() or 1,
        seed=args.seed,
        classes=classes,
        slot=args.reader,
        fuse=fuse,
        source=source,
        cache=cache,
        cross=args.cross,
        floor=args.floor,
        either=args.either,
        **settings,
    )
    _report_cache(cache)
    args.out.mkdir(parents=True, exist_ok=True)
    package.save(args.out / "model.pt")
    print(f"{args.out / 'model.pt'}: {package.name} {package.version}")
    for name, r in record["classes"].items():
        kept = "fused" if name in record["fused"] else "left to the ensemble"
        print(
            f"  {name}: out-of-fold study AUC {r['fused_auc_out_of_fold']:.4f} against the"
            f" ensemble's {r['ensemble_auc']:.4f}: {kept}"
        )
        if "cross_weights" in r:
            weights = ", ".join(f"{k} {v:+.3f}" for k, v in r["cross_weights"].items())
            print(f"    also reads the ensemble's {weights}")
        if "floor" in r:
            print(f"    floor under the ensemble's logit: {r['floor']}")
        if "either" in r:
            print(f"    either fusion: {', '.join(f'{v:+.3f}' for v in r['either'])}")


def _net_source(spec: str, slots: tuple[str, ...]) -> Any:
    """The trained strip network of PACKAGE:SLOT, with the studies it trained on, read again
    from the sets its package's record names (so they can be checked against the fit studies)."""
    from inference.convexity_fit import NetSource
    from inference.data import DataSource, read_source
    from inference.datasets import item_key, pseudonym, recorded
    from inference.package import ModelPackage

    path, _, slot = spec.rpartition(":")
    if not path or slot not in slots:
        raise ValueError(
            f"--net-from {spec}: expected PACKAGE:SLOT, SLOT one of {', '.join(slots)}"
        )
    package = ModelPackage.load(Path(path))
    reader, record = getattr(package, slot), package.training.get(slot)
    if reader is None or not record:
        raise ValueError(f"--net-from {spec}: {path} has no {slot} reader")
    if "net_trained_on" in record:  # packages made since 6.9.0 name them
        train_keys = recorded(record["net_trained_on"])
    else:
        train_keys = set()
        for train in record["data"]["train"]:
            kind, _, where = train.partition(":")
            if not Path(where).is_dir():
                raise ValueError(
                    f"--net-from {spec}: its training studies {where} (relative to the"
                    " directory the command runs in) are not here, so the fit studies cannot be"
                    " checked against them"
                )
            found = read_source(DataSource(kind=kind, path=where))
            train_keys |= {pseudonym(item_key(i)) for i in found}
        if len(train_keys) != record["train_studies"]:
            raise ValueError(
                f"--net-from {spec}: {', '.join(record['data']['train'])} no longer hold the"
                f" {record['train_studies']} studies its network trained on"
            )
    return NetSource(reader, record, f"{package.name} {package.version}, {slot} reader", train_keys)


def _data_spec(spec: str, kinds: tuple[str, ...] = DATA_KINDS) -> tuple[str, str]:
    """KIND and PATH of a KIND:PATH --data or --fit argument, KIND one of ``kinds``."""
    kind, _, path = spec.partition(":")
    if kind not in kinds or not path:
        raise ValueError(f"{spec}: expected KIND:PATH, KIND one of {', '.join(kinds)}")
    return kind, path


def _fresh_studies(
    specs: list[str], seen: set[str], model: Path, kinds: tuple[str, ...] = DATA_KINDS
) -> list[Any]:
    """The studies of KIND:PATH specs, refusing any the model already used."""
    from inference.data import DataSource, read_source
    from inference.datasets import item_key, pseudonym

    items = []
    for spec in specs:
        kind, path = _data_spec(spec, kinds)
        found = read_source(DataSource(kind=kind, path=path))
        used = [k for k in map(item_key, found) if pseudonym(k) in seen]
        if used:
            raise ValueError(
                f"{path}: {len(used)} studies were already used by {model} (first {used[0]})"
            )
        items += found
    return items


def _refit_heads(args: argparse.Namespace) -> None:
    import torch

    from inference.data import prepare
    from inference.datasets import recorded
    from inference.heads import DEFAULT_L2, refit_heads
    from inference.package import ModelPackage
    from inference.progress import progress

    _check_out_folder(args.out, args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    package = ModelPackage.load(args.model)
    seen = recorded(k for part in package.training.get("split", {}).values() for k in part)
    volumes = []
    for spec in args.data:
        kind = spec.partition(":")[0]
        items = _fresh_studies([spec], seen, args.model)
        bar = progress(desc=f"prepare {kind}", unit="study", total=len(items))
        volumes += prepare(items, package.preprocess, kind, progress=bar)
        bar.close()
    cache = _feature_cache()
    report = refit_heads(
        package,
        volumes,
        version=args.version,
        folds=args.folds,
        seed=args.seed,
        data=list(args.data),
        l2_grid=tuple(args.l2) if args.l2 else DEFAULT_L2,
        attention_weights=tuple(args.attention_weight) if args.attention_weight else (0.0,),
        max_attention_drop=args.max_attention_drop,
        attention_per_class=args.attention_slices,
        cache=cache,
    )
    _report_cache(cache)
    args.out.mkdir(parents=True, exist_ok=True)
    package.save(args.out / "model.pt")
    chosen = report["cross_validated_study_auc"][f"{report['l2_chosen']:g}"]["mean"]
    before = report["members_own_heads_study_auc"]["mean"]
    print(
        f"{args.out / 'model.pt'}: {package.name} {package.version}, head L2 "
        f"{report['l2_chosen']:g}, attention weight {report['attention_weight']:g}, "
        f"out-of-fold mean study AUC {chosen:.4f} "
        f"(the members' own heads: {before:.4f})"
    )


def _feature_cache() -> Any:
    """The network-embedding cache ICH_FEATURE_CACHE names (``feature_cache``), None if off."""
    from inference.feature_cache import FeatureCache

    return FeatureCache.from_env()


def _report_cache(cache: Any) -> None:
    if cache is not None and cache.hits + cache.misses:
        print(
            f"feature cache {cache.root}: {cache.hits} of {cache.hits + cache.misses} studies'"
            " embeddings read, the others computed (ICH_FEATURE_CACHE=off: no cache)",
            file=sys.stderr,
        )


def _cpu() -> Any:
    import torch

    return torch.device("cpu")


if __name__ == "__main__":
    sys.exit(main())
