"""How far the tiny training run of tests/inference/test_training.py gets, for other data, seeds
and settings: trains its recipe (TINY_RECIPE) with overrides and prints the held-out study and
slice AUC for "any" on two phantom test sets, as one JSON line (also appended to --results).

    .venv/bin/python scripts/tiny_sweep.py NAME --train-seed 11 --seed 3 \
        [--train-studies 80] [--set epochs=8 --set preprocess.image_size=128 ...]

Phantoms are written once under --data (at --min-size, default as in the test; --favour a,b
draws those subtypes more often in the training set) and reused:
the training set (--train-seed, --train-studies), the test's held-out set (seed 22, 48 studies)
and the smaller one the test used before (seed 12, 24 studies). Overrides are JSON values;
dotted keys go into a section (preprocess., augment.). One run costs 3-9 minutes on one core
(--set threads=1 runs two at once on a 2-core machine).
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.data import DataSource
from inference.evaluation import evaluate
from inference.phantom import write_dataset
from inference.training import TrainConfig, train
from tests.inference.test_training import TINY_MIN_SIZE, TINY_RECIPE, TINY_SETS

TRAIN_STUDIES, TRAIN_SEED = TINY_SETS["train"]
# the test's held-out set (48 studies, seed 22) and the smaller one it used before
HELD_OUT = {"test48": TINY_SETS["test"][::-1], "test24": (12, 24)}  # seed, studies


def phantoms(
    root: Path, seed: int, studies: int, min_size: str, favour: tuple[str, ...] = ()
) -> Path:
    path = root / "-".join([f"seed{seed}", str(studies), min_size, *favour])
    if not (path / "complete").exists():
        write_dataset(path, studies, seed=seed, progress=False, min_size=min_size, favour=favour)
        (path / "complete").touch()
    return path


def recipe(overrides: list[str]) -> dict:
    out = copy.deepcopy(TINY_RECIPE)
    for item in overrides:
        key, _, value = item.partition("=")
        target = out
        *sections, leaf = key.split(".")
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = json.loads(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("--train-seed", type=int, default=TRAIN_SEED)
    parser.add_argument("--train-studies", type=int, default=TRAIN_STUDIES)
    parser.add_argument("--seed", type=int, default=TINY_RECIPE["seed"])
    parser.add_argument("--min-size", default=TINY_MIN_SIZE)
    parser.add_argument("--favour", default="", help="subtypes the training set favours, a,b")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    parser.add_argument("--data", type=Path, default=Path("var/tiny-sweep/data"))
    parser.add_argument("--runs", type=Path, default=Path("var/tiny-sweep/runs"))
    parser.add_argument("--results", type=Path, default=Path("var/tiny-sweep/results.jsonl"))
    args = parser.parse_args()

    favour = tuple(s for s in args.favour.split(",") if s)
    train_path = phantoms(args.data, args.train_seed, args.train_studies, args.min_size, favour)
    run_dir = args.runs / args.name
    config = {
        **recipe(args.set),
        "seed": args.seed,
        "out_dir": str(run_dir),
        "sources": [{"kind": "phantom", "path": str(train_path)}],
    }
    started = time.monotonic()
    model = train(TrainConfig.from_dict(config), progress=False)
    result: dict = {
        "name": args.name,
        "train_seed": args.train_seed,
        "train_studies": args.train_studies,
        "seed": args.seed,
        "min_size": args.min_size,
        "favour": list(favour),
        "set": args.set,
        "train_s": round(time.monotonic() - started),
    }
    for label, (seed, studies) in HELD_OUT.items():
        source = DataSource("phantom", str(phantoms(args.data, seed, studies, args.min_size)))
        report = evaluate(model, source, run_dir / label, bootstrap_rounds=50)
        result[f"{label}_study_auc"] = report["study_level"]["any"]["auc"]
        result[f"{label}_slice_auc"] = report["slice_level"]["any"]["auc"]
        result[f"{label}_pointing"] = report["pointing_game"]["any"]["hit_rate"]
    print(json.dumps(result))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
