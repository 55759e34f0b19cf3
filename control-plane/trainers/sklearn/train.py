#!/usr/bin/env python3
"""A Drover training job in Python: scikit-learn logistic regression exported with skl2onnx.

The job contract (see control-plane/src/jobs/mod.rs): read the training CSV (feature
columns, last column `label`), write `model.onnx` and `metrics.json` into the output
directory. Paths come as arguments or as $DROVER_DATASET and $DROVER_OUT.

    python3 train.py --data train.csv --out out/

The model is exported without ZipMap and without a Scaler node (tract, which devices
run, does not implement ai.onnx.ml:Scaler), so it loads on every agent.
"""
import argparse
import json
import os
import sys

import numpy as np
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("DROVER_DATASET"))
    ap.add_argument("--out", default=os.environ.get("DROVER_OUT"))
    ap.add_argument("--c", type=float, default=10.0, help="inverse regularisation strength")
    args = ap.parse_args()
    if not args.data or not args.out:
        print("need --data and --out (or DROVER_DATASET and DROVER_OUT)", file=sys.stderr)
        return 2
    with open(args.data) as f:
        header = f.readline().strip().split(",")
    if header[-1] != "label":
        print(f"{args.data}: last column is {header[-1]!r}, expected 'label'", file=sys.stderr)
        return 2
    table = np.loadtxt(args.data, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
    x = table[:, :-1].astype(np.float32)
    y = table[:, -1].astype(np.int64)
    clf = LogisticRegression(C=args.c, max_iter=1000).fit(x, y)
    onx = to_onnx(
        clf,
        x[:1],
        options={id(clf): {"zipmap": False}},
        target_opset={"": 13, "ai.onnx.ml": 1},
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model.onnx"), "wb") as f:
        f.write(onx.SerializeToString())
    metrics = {
        "train_accuracy": float(clf.score(x, y)),
        "rows": int(len(y)),
        "features": header[:-1],
        "classes": [int(c) for c in clf.classes_],
        "trainer": "sklearn-logistic-regression",
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"trained on {len(y)} rows: train accuracy {metrics['train_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
