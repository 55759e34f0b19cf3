#!/usr/bin/env python3
"""onnxruntime's side of `agent/benches/onnx_ml.rs`: times each model on the same inputs the
Rust side uses (the fixture's batch and its first row), one thread, sequential execution.

Usage: onnx_ml_ort.py FIXTURE_DIR FLOOR_DIR ITERATIONS FAMILY...   -> prints one JSON object
{family: {"batch": s, "row": s, "batch_floor": s, "row_floor": s}}

A FAMILY may be a path relative to FIXTURE_DIR (`../fixtures/cnn`); its floor file is named
with `/` replaced by `_`.

Times are seconds per `InferenceSession.run` call from Python (numpy in and out, the binding's
overhead included). "*_floor" time FLOOR_DIR/<family>.onnx, an Identity graph over the same
inputs written by the Rust side: what a call costs when the model does nothing.
"""
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort


def load_inputs(doc):
    feeds = {}
    for t in doc["inputs"]:
        dtype = np.float32 if t["dtype"] == "F32" else np.int64
        data = [np.nan if v is None else v for v in t["data"]]
        feeds[t["name"]] = np.array(data, dtype=dtype).reshape(t["shape"])
    return feeds


def per_call(sess, feeds, iterations):
    for _ in range(max(10, iterations // 10)):
        sess.run(None, feeds)
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iterations):
            sess.run(None, feeds)
        samples.append((time.perf_counter() - t0) / iterations)
    return sorted(samples)[len(samples) // 2]


def main():
    here, floors, iterations, families = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    out = {}
    def session(path):
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    for family in families:
        sess = session(os.path.join(here, family + ".onnx"))
        floor = session(os.path.join(floors, family.replace("/", "_") + ".onnx"))
        with open(os.path.join(here, family + ".json")) as f:
            feeds = load_inputs(json.load(f))
        row = {k: v[:1] for k, v in feeds.items()}
        out[family] = {
            "batch": per_call(sess, feeds, iterations),
            "row": per_call(sess, row, iterations),
            "batch_floor": per_call(floor, feeds, iterations),
            "row_floor": per_call(floor, row, iterations),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
