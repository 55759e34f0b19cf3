#!/usr/bin/env python3
"""Exports one model per classic-ML family with the real exporters, plus a fixed input batch
and onnxruntime's reference outputs. The agent's tests (`agent/tests/sklearn.rs`) read the
committed files and need no Python; the benchmark (`agent/benches/onnx_ml.rs`) times
onnxruntime on the same files.

Run from anywhere:
    pip install onnx onnxruntime scikit-learn skl2onnx onnxmltools lightgbm
    python3 agent/tests/sklearn/make_sklearn.py          # rewrite the fixtures
    python3 agent/tests/sklearn/make_sklearn.py --check  # rebuild in a temp dir, compare to the committed ones

Outputs, for each family <name> (all well under 200 KB):
  <name>.onnx  the exported model (ai.onnx.ml opset 3, zipmap=False for classifiers)
  <name>.json  {"exporter", "inputs": 16-row batch, "outputs": onnxruntime's outputs, "ops": node op types}
  zipmap_refused.onnx  a classifier exported with the default zipmap=True (ai.onnx.ml:ZipMap, which the
                       agent refuses by name)
  svm_refused.onnx     an SVC (ai.onnx.ml:SVMClassifier, not supported yet: refused by name), with its .json
"""
import json
import os
import sys
import tempfile

import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.datasets import make_classification, make_regression
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Binarizer, LabelEncoder, Normalizer, OneHotEncoder, StandardScaler

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = {"": 17, "ai.onnx.ml": 3}
ROWS = 16
CLF = {"zipmap": False}


def tensor_json(name, arr):
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        # NaN (the imputer's input) is not JSON: written as null.
        dtype = "F32"
        data = [None if np.isnan(x) else float(x) for x in arr.astype(np.float32).ravel()]
    else:
        dtype, data = "I64", [int(x) for x in arr.astype(np.int64).ravel()]
    return {"name": name, "shape": list(arr.shape), "dtype": dtype, "data": data}


def emit(out, name, exporter, model, x):
    path = os.path.join(out, name + ".onnx")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {sess.get_inputs()[0].name: x}
    outs = sess.run(None, feeds)
    doc = {
        "exporter": exporter,
        "ops": sorted({(n.domain or "ai.onnx") + ":" + n.op_type for n in model.graph.node}),
        "inputs": [tensor_json(k, v) for k, v in feeds.items()],
        "outputs": [tensor_json(o.name, v) for o, v in zip(sess.get_outputs(), outs)],
    }
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(doc, f, indent=None)
        f.write("\n")


def skl(name, est, x_train, y_train, x, out, options=None):
    est.fit(x_train, y_train)
    m = to_onnx(est, x_train[:1], target_opset=OPSET, options=options)
    emit(out, name, "skl2onnx", m, x)


def build(out):
    Xc, yc = make_classification(
        n_samples=400, n_features=10, n_informative=6, n_classes=3, random_state=0
    )
    Xc = Xc.astype(np.float32)
    Xb, yb = make_classification(n_samples=400, n_features=10, random_state=1)
    Xb = Xb.astype(np.float32)
    Xr, yr = make_regression(n_samples=400, n_features=10, noise=0.5, random_state=2)
    Xr, yr = Xr.astype(np.float32), yr.astype(np.float32)
    batch_c, batch_b, batch_r = Xc[-ROWS:], Xb[-ROWS:], Xr[-ROWS:]

    skl("scaler_logreg", make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
        Xc, yc, batch_c, out, CLF)
    skl("logreg_binary", make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
        Xb, yb, batch_b, out, CLF)
    skl("scaler_mlp", make_pipeline(StandardScaler(), MLPClassifier((16,), max_iter=600, random_state=0)),
        Xc, yc, batch_c, out, CLF)
    skl("linreg", LinearRegression(), Xr, yr, batch_r, out)

    # Imputer: NaNs in the training data and in the probe batch.
    Xn = Xr.copy()
    rng = np.random.default_rng(3)
    Xn[rng.random(Xn.shape) < 0.1] = np.nan
    batch_n = Xn[-ROWS:].copy()
    batch_n[0, :3] = np.nan
    skl("imputer_normalizer_linreg",
        make_pipeline(SimpleImputer(strategy="mean"), Normalizer(norm="l2"), LinearRegression()),
        Xn, yr, batch_n, out)
    skl("binarizer_logreg", make_pipeline(Binarizer(threshold=0.1), LogisticRegression(max_iter=500)),
        Xc, yc, batch_c, out, CLF)
    skl("normalizer_max_logreg", make_pipeline(Normalizer(norm="max"), LogisticRegression(max_iter=500)),
        Xc, yc, batch_c, out, CLF)

    # One-hot over integer categories; the probe batch holds a category never seen in training.
    Xi = rng.integers(0, 4, size=(400, 3)).astype(np.int64)
    yi = (Xi[:, 0] * 1.5 - Xi[:, 1] + (Xi[:, 2] == 2) * 3.0).astype(np.float32)
    batch_i = Xi[-ROWS:].copy()
    batch_i[0, 0] = 9
    skl("onehot_linreg", make_pipeline(OneHotEncoder(handle_unknown="ignore"), LinearRegression()),
        Xi, yi, batch_i, out)

    # LabelEncoder over int64 labels (skl2onnx emits ai.onnx.ml:LabelEncoder keys/values int64).
    le = LabelEncoder().fit(np.array([3, 10, 42, 7, 100], np.int64))
    m = to_onnx(le, np.array([3], np.int64), target_opset=OPSET)
    probe = np.array([3, 10, 42, 7, 100, 5, 3, 42, 10, 7, 100, 100, -1, 3, 7, 42], np.int64)
    emit(out, "label_encoder", "skl2onnx", m, probe)

    skl("forest_clf", RandomForestClassifier(n_estimators=20, max_depth=6, random_state=0),
        Xc, yc, batch_c, out, CLF)
    skl("gb_clf_binary", GradientBoostingClassifier(n_estimators=30, max_depth=3, random_state=0),
        Xb, yb, batch_b, out, CLF)
    skl("gb_clf", GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0),
        Xc, yc, batch_c, out, CLF)
    skl("forest_reg", RandomForestRegressor(n_estimators=20, max_depth=6, random_state=0),
        Xr, yr, batch_r, out)
    skl("gb_reg", GradientBoostingRegressor(n_estimators=50, max_depth=3, random_state=0),
        Xr, yr, batch_r, out)

    try:
        import lightgbm
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType
    except ImportError:
        if os.environ.get("DROVER_REQUIRE_PEERS") == "1":
            raise
        print("lightgbm/onnxmltools not installed: LightGBM fixtures not rebuilt", file=sys.stderr)
    else:
        ft = [("input", FloatTensorType([None, 10]))]
        clf = lightgbm.LGBMClassifier(n_estimators=30, num_leaves=15, random_state=0, verbose=-1)
        clf.fit(Xc, yc)
        m = onnxmltools.convert_lightgbm(clf, initial_types=ft, target_opset=15, zipmap=False)
        emit(out, "lgbm_clf", "onnxmltools (LightGBM)", m, batch_c)
        reg = lightgbm.LGBMRegressor(n_estimators=50, num_leaves=15, random_state=0, verbose=-1)
        reg.fit(Xr, yr)
        m = onnxmltools.convert_lightgbm(reg, initial_types=ft, target_opset=15)
        emit(out, "lgbm_reg", "onnxmltools (LightGBM)", m, batch_r)

    # Default export (zipmap=True): a ZipMap node producing a sequence of maps.
    est = LogisticRegression(max_iter=500).fit(Xc, yc)
    m = to_onnx(est, Xc[:1], target_opset=OPSET)
    with open(os.path.join(out, "zipmap_refused.onnx"), "wb") as f:
        f.write(m.SerializeToString())
    # A family the agent does not run yet: support vector machines (ai.onnx.ml:SVMClassifier).
    from sklearn.svm import SVC
    est = SVC(kernel="rbf").fit(Xc[:100], yc[:100])
    m = to_onnx(est, Xc[:1], target_opset=OPSET, options=CLF)
    emit(out, "svm_refused", "skl2onnx", m, batch_c)


def check():
    """Rebuilds into a temp dir and compares the reference outputs with the committed ones."""
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp)
        for f in sorted(os.listdir(tmp)):
            if not f.endswith(".json"):
                continue
            new = json.load(open(os.path.join(tmp, f)))
            old = json.load(open(os.path.join(HERE, f)))
            for a, b in zip(new["outputs"], old["outputs"]):
                x = np.array([np.nan if v is None else v for v in a["data"]], np.float64)
                y = np.array([np.nan if v is None else v for v in b["data"]], np.float64)
                if x.shape != y.shape or not np.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True):
                    print(f"{f}: output {a['name']} differs from the committed fixture")
                    bad += 1
    print("fixtures up to date" if not bad else f"{bad} outputs differ")
    return 1 if bad else 0


if __name__ == "__main__":
    if "--check" in sys.argv:
        sys.exit(check())
    build(HERE)
    for f in sorted(os.listdir(HERE)):
        print(f, os.path.getsize(os.path.join(HERE, f)))
