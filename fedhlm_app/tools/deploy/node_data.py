"""One data folder per SuperNode, cut from a dataset as the simulation cuts it.

    python -m fedhlm_app.tools.deploy.node_data --data-dir data/ag_news --out node-data --num-partitions 4 \\
        --run-config conf/smoke.toml

writes ``node-data/partition-<i>/{train.csv,test.csv,classes.txt}``. Copy folder ``i`` to
the machine of SuperNode ``i`` and start it with ``data-path="<that folder>"`` in its
``--node-config``. The split is the simulation's (same Dirichlet partition, seed and
truncation, taken from the run config), so a deployment and a ``flwr run`` simulation
of one config see the same items. Labels are written as class names beside a full
``classes.txt``, so a folder that lacks some classes still maps them to the
federation's class ids.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from fedhlm_app.config import ConfigError, RunConfig, validate
from fedhlm_app.data.datasets import DataError, Dataset, Split, load_local, resolve_data_dir
from fedhlm_app.tools.launch import merged_config
from fedhlm_app.data.partition import configured_partitions


def _write_split(path: Path, split: Split, class_names: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "text"])
        writer.writerows((class_names[int(y)], text) for text, y in zip(split.texts, split.labels))


def write_node_folders(dataset: Dataset, cfg: RunConfig, num_partitions: int, out: Path) -> list[Path]:
    """``out/partition-<i>`` for each partition: its train rows (fit and calibration) and test rows."""
    subset = dataset.truncated(cfg.max_train_items, cfg.max_test_items, cfg.seed)
    train, test = subset.train, subset.test
    parts = configured_partitions(train.labels, test.labels, num_partitions, cfg)
    folders = []
    for pid, part in enumerate(parts):
        folder = out / f"partition-{pid}"
        folder.mkdir(parents=True, exist_ok=True)
        _write_split(folder / "train.csv", train.subset(np.sort(np.concatenate([part.fit, part.calibration]))), dataset.class_names)
        _write_split(folder / "test.csv", test.subset(part.test), dataset.class_names)
        (folder / "classes.txt").write_text("\n".join(dataset.class_names) + "\n", encoding="utf-8")
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="", help="the whole dataset's CSV folder (default: $FEDHLM_DATA_DIR)")
    parser.add_argument("--out", type=Path, required=True, help="folder for partition-<i>/ (created)")
    parser.add_argument("--num-partitions", type=int, required=True, help="one per SuperNode")
    parser.add_argument("--run-config", type=Path, action="append", default=[],
                        help="run-config TOML whose seed, alpha and item limits to use (repeatable)")
    args = parser.parse_args(argv)
    if args.num_partitions < 1:
        parser.error(f"--num-partitions must be >= 1, got {args.num_partitions}")
    try:
        cfg = validate(merged_config([str(p) for p in args.run_config], []))
        dataset = load_local(resolve_data_dir(args.data_dir), cfg.train_file, cfg.test_file)
        folders = write_node_folders(dataset, cfg, args.num_partitions, args.out)
    except (ConfigError, DataError, ValueError) as exc:
        parser.error(str(exc))
    for pid, folder in enumerate(folders):
        rows = sum(1 for _ in (folder / "train.csv").open(encoding="utf-8")) - 1
        print(f"partition {pid}: {folder} ({rows} train rows)")


if __name__ == "__main__":
    main()
