#!/usr/bin/env python3
"""Writes corpus/infer_request (git-ignored): valid and borderline KServe v2 requests in
both framings. The target's first byte picks the framing: below 128 JSON only; from 128
the binary tensor data extension, the JSON part's length a share of the body (see
fuzz_targets/infer_request.rs); the binary seeds pick the byte that splits exactly."""
import json, os, struct

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    out = os.path.join(HERE, "corpus", "infer_request")
    os.makedirs(out, exist_ok=True)
    jsons = {
        "nested": {"id": "r1", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2.5], [True, -4]]}], "outputs": [{"name": "y"}]},
        "int64": {"inputs": [{"name": "x", "shape": [3], "datatype": "INT64", "data": [1, -2, 9007199254740993]}]},
        "bool": {"inputs": [{"name": "x", "shape": [2], "datatype": "BOOL", "data": [True, False]}]},
        "bytes": {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["abc"]}]},
        "overflow": {"inputs": [{"name": "x", "shape": [4294967296, 4294967296], "datatype": "FP32", "data": [1]}]},
        "none": {"inputs": []},
    }
    for name, req in jsons.items():
        open(os.path.join(out, f"json-{name}"), "wb").write(b"\x00" + json.dumps(req).encode())
    header = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "parameters": {"binary_data_size": 16}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    tensor = struct.pack("<4f", 1.0, 2.5, float("nan"), float("inf"))
    # JSON may end in spaces: pad the header until some first byte splits exactly.
    while not any(m * (len(header) + 16) // 127 == len(header) for m in range(128)):
        header += b" "
    body = header + tensor
    mode = next(m for m in range(128) if m * len(body) // 127 == len(header))
    open(os.path.join(out, "binary-fp32"), "wb").write(bytes([128 + mode]) + body)
    print(f"seeds: {len(os.listdir(out))} infer_request")


if __name__ == "__main__":
    main()
