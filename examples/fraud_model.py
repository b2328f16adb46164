"""Data and models for examples/fraud.yaml: what a first user of the fraud pipeline needs.

    python examples/fraud_model.py [--out DIR] [--events 3000] [--seed 7]

writes, deterministically (the same files for the same seed):

- ``data.csv``    reference data: one column per feature (``--reference data.csv``);
- ``model.onnx``  a scikit-learn logistic regression exported by skl2onnx (float32 input);
- ``v2.onnx``     a second model (scaled features, stronger regularisation), for a challenger;
- ``events.csv``  payments to produce (``loopline produce fraud events.csv``), with event ids;
- ``labels.csv``  their chargeback labels, ``event_id,is_fraud`` (``loopline feedback --file``).

The models follow Loopline's input contract for one input: a float tensor ``[N, k]`` of the
numeric and bool features in spec order (bool as 0/1; strings such as ``customer_id`` and
``country`` are not part of it). The label is the class name as a string: "0" or "1".
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from loopline.scoring import tabular_features
from loopline.spec import load_spec

SPEC = Path(__file__).resolve().parent / "fraud.yaml"
COUNTRIES = ["DE", "FR", "GB", "NL", "US"]
CUSTOMERS = 500


def payments(n: int, rng: np.random.Generator, seed: int,
             start: int = 0) -> list[dict[str, Any]]:
    """``n`` payments with their label: large night-time payments to risky merchants are fraud."""
    rows = []
    for i in range(start, start + n):
        amount = round(float(rng.lognormal(3.5, 1.2)), 2)
        risk = round(float(rng.beta(2, 5)), 3)
        hour = int(rng.integers(0, 24))
        present = bool(rng.random() < 0.6)
        device = int(rng.integers(0, 2000)) if rng.random() < 0.9 else None  # optional feature
        score = (0.8 * np.log(amount) + 5.0 * risk + (1.5 if hour < 6 else 0.0)
                 - (1.5 if present else 0.0) - 0.002 * (device or 0) - 6.0)
        fraud = rng.random() < 1 / (1 + np.exp(-score))
        rows.append({"event_id": f"pay-{seed}-{i}",
                     "customer_id": f"c{int(rng.integers(CUSTOMERS))}",
                     "amount": amount, "merchant_risk": risk, "hour": hour,
                     "country": COUNTRIES[int(rng.integers(len(COUNTRIES)))],
                     "card_present": present, "device_age_days": device,
                     "is_fraud": "1" if fraud else "0"})
    return rows


def matrix(rows: list[dict[str, Any]], columns: list[str]) -> np.ndarray:
    """The single-input tensor: the numeric and bool features in spec order, float32."""
    # a missing optional value (Loopline fills the reference mean)
    fill = {"device_age_days": 365.0}
    return np.array([[float(r[c]) if r[c] is not None else fill[c] for c in columns]
                     for r in rows], dtype=np.float32)


def export(model: Any, sample: np.ndarray) -> bytes:
    """The model as ONNX (its input type and width from ``sample``), the same bytes every run."""
    onx = to_onnx(model, sample)
    # skl2onnx lists the opsets in set order, which changes with Python's hash seed.
    imports = sorted(onx.opset_import, key=lambda o: o.domain)
    del onx.opset_import[:]
    onx.opset_import.extend(imports)
    return onx.SerializeToString()  # type: ignore[no-any-return]  # onnx is untyped


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as CSV: booleans as true/false, a missing optional value as an empty cell."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(columns)
        for r in rows:
            out.writerow(["" if r[c] is None else str(r[c]).lower() if isinstance(r[c], bool)
                          else r[c] for c in columns])


def main() -> None:
    """Write the example's files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="Folder to write to.")
    parser.add_argument("--events", type=int, default=3000, help="Payments in events.csv.")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    spec = load_spec(SPEC)
    columns = tabular_features(spec)  # amount, merchant_risk, hour, card_present, device_age_days
    features = [f.name for f in spec.features]
    rng = np.random.default_rng(args.seed)
    train = payments(4000, rng, args.seed, start=-4000)
    x, y = matrix(train, columns), np.array([int(r["is_fraud"]) for r in train])
    first = LogisticRegression(max_iter=1000).fit(x, y)
    second = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000)).fit(x, y)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, model in (("model.onnx", first), ("v2.onnx", second)):
        (args.out / name).write_bytes(export(model, x[:1]))
    write_csv(args.out / "data.csv", train[:2000], features)
    events = payments(args.events, rng, args.seed)
    write_csv(args.out / "events.csv", events, ["event_id", *features])
    write_csv(args.out / "labels.csv", events, ["event_id", spec.label.name])
    fraud = sum(r["is_fraud"] == "1" for r in events)
    print(f"wrote model.onnx, v2.onnx, data.csv, events.csv ({len(events)} payments, "
          f"{fraud} fraud) and labels.csv to {args.out.resolve()}")


if __name__ == "__main__":
    main()
