"""Data and models for examples/sea.yaml: the SEA stream the demo uses, as files.

    python examples/sea_model.py [--out DIR] [--events 4000] [--seed 7]

writes, deterministically (the same files for the same seed):

- ``data.csv``    reference data, columns x1, x2, x3 (``--reference data.csv``);
- ``model.onnx``  a scikit-learn logistic regression exported by skl2onnx (float32 input [N, 3]);
- ``v2.onnx``     a second model, fitted on the concept after the drift, for a challenger;
- ``events.csv``  events to produce; the concept drifts halfway (the SEA threshold moves from
  8 to 9.5: the features look the same, their meaning does not);
- ``labels.csv``  their labels, ``event_id,y`` (``loopline feedback sea --file labels.csv``).

SEA (Street & Kim, 2001): three uniform features in [0, 10]; the label is x1 + x2 <= threshold,
as the class names "true" and "false".
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from fraud_model import export  # the same export, the same bytes every run
from sklearn.linear_model import LogisticRegression

from loopline.scoring import tabular_features
from loopline.spec import load_spec

SPEC = Path(__file__).resolve().parent / "sea.yaml"
BEFORE, AFTER = 8.0, 9.5  # SEA's thresholds of variants 0 and 3, as in `loopline demo`


def sea(n: int, threshold: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` SEA rows (float32) and their labels ("true"/"false") under ``threshold``."""
    x = rng.uniform(0, 10, size=(n, 3)).astype(np.float32)
    return x, np.where(x[:, 0] + x[:, 1] <= threshold, "true", "false")


def main() -> None:
    """Write the example's files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="Folder to write to.")
    parser.add_argument("--events", type=int, default=4000, help="Events in events.csv.")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    columns = tabular_features(load_spec(SPEC))  # x1, x2, x3: the single-input contract's order
    rng = np.random.default_rng(args.seed)
    x, y = sea(2000, BEFORE, rng)
    x2, y2 = sea(2000, AFTER, rng)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (xs, ys) in (("model.onnx", (x, y)), ("v2.onnx", (x2, y2))):
        model = LogisticRegression(max_iter=1000).fit(xs, ys)
        (args.out / name).write_bytes(export(model, xs[:1]))
    with (args.out / "data.csv").open("w", newline="") as f:
        rows = (row.astype(float).round(4).tolist() for row in x[:1000])
        csv.writer(f).writerows([columns, *rows])
    half = args.events // 2
    ex, ey = (np.concatenate(parts) for parts in zip(sea(half, BEFORE, rng),
                                                     sea(args.events - half, AFTER, rng),
                                                     strict=True))
    with (args.out / "events.csv").open("w", newline="") as events, \
            (args.out / "labels.csv").open("w", newline="") as labels:
        ev, lab = csv.writer(events), csv.writer(labels)
        ev.writerow(["event_id", *columns])
        lab.writerow(["event_id", "y"])
        for i, (row, label) in enumerate(zip(ex, ey, strict=True)):
            ev.writerow([f"sea-{args.seed}-{i}", *row.astype(float).round(4).tolist()])
            lab.writerow([f"sea-{args.seed}-{i}", label])
    print(f"wrote model.onnx, v2.onnx, data.csv, events.csv ({args.events} events, the concept "
          f"drifts at event {half}) and labels.csv to {args.out.resolve()}")


if __name__ == "__main__":
    main()
