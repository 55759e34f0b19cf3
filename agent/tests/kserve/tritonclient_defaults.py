"""tritonclient.http with its default settings against a running drover-agent.

Run by agent/tests/kserve_tritonclient.rs: the agent serves model "dense" version 1.0.0
(active) and holds 2.0.0 as a shadow candidate. Every call uses the client's defaults:
inputs and outputs travel with the binary tensor data extension. Outputs are compared
with onnxruntime on the same inputs. Prints one JSON line {"checks": [...]} on success;
exits non-zero naming the failed check otherwise.

    python3 tritonclient_defaults.py HOST:PORT path/to/dense_v1.onnx
"""
import json
import sys

import numpy as np
import onnxruntime as ort
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, v1_path = sys.argv[1], sys.argv[2]
client = httpclient.InferenceServerClient(url=url)
passed = []


def check(name, ok, detail=""):
    if not ok:
        sys.exit(f"FAIL {name}: {detail}")
    passed.append(name)


def refused(name, call, needle):
    try:
        call()
    except InferenceServerException as e:
        check(name, needle in str(e.message()), e.message())
        return
    check(name, False, "no error")


# Readiness and metadata.
check("server live", client.is_server_live())
check("server ready", client.is_server_ready())
server = client.get_server_metadata()
check("server metadata lists binary_tensor_data", "binary_tensor_data" in server["extensions"], server)
check("model ready", client.is_model_ready("dense"))
check("served version ready", client.is_model_ready("dense", "1.0.0"))
check("shadow version not ready", not client.is_model_ready("dense", "2.0.0"))
check("unknown version not ready", not client.is_model_ready("dense", "9.9.9"))
meta = client.get_model_metadata("dense")
check(
    "model metadata",
    meta["name"] == "dense"
    and meta["versions"] == ["1.0.0"]
    and meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    and meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    meta,
)
check("versioned metadata", client.get_model_metadata("dense", "1.0.0")["name"] == "dense")
refused("unknown version metadata", lambda: client.get_model_metadata("dense", "9.9.9"), "9.9.9")
refused("unknown model metadata", lambda: client.get_model_metadata("nope"), "nope")

# Repository index.
index = client.get_model_repository_index()
check(
    "repository index",
    sorted((m["name"], m["version"], m["state"]) for m in index)
    == [("dense", "1.0.0", "READY"), ("dense", "2.0.0", "UNAVAILABLE")],
    index,
)

# Inference with defaults: binary inputs; no outputs named, so binary outputs.
rng = np.random.default_rng(7)
x = rng.normal(0, 1, (5, 16)).astype(np.float32)
reference = ort.InferenceSession(v1_path, providers=["CPUExecutionProvider"])
want = reference.run(None, {"x": x})[0]
inp = httpclient.InferInput("x", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
check("input goes binary by default", "binary_data_size" in inp._get_tensor()["parameters"])
r = client.infer("dense", [inp])
y = r.as_numpy("y")
check("infer matches onnxruntime", y.shape == want.shape and np.allclose(y, want, atol=1e-4), (y, want))
check("output came binary", r.get_output("y")["parameters"]["binary_data_size"] == want.nbytes, r.get_response())
check("served version", r.get_response()["model_version"] == "1.0.0", r.get_response())

# A requested output (binary by default), a version, a request id.
r = client.infer(
    "dense",
    [inp],
    model_version="1.0.0",
    outputs=[httpclient.InferRequestedOutput("y")],
    request_id="req-7",
)
check("versioned infer", np.allclose(r.as_numpy("y"), want, atol=1e-4))
check("request id echoed", r.get_response()["id"] == "req-7", r.get_response())

# NaN and Inf travel through binary tensors both ways; rows without them are unaffected.
x2 = x.copy()
x2[0, 0] = np.nan
x2[1, 3] = np.inf
inp2 = httpclient.InferInput("x", list(x2.shape), "FP32")
inp2.set_data_from_numpy(x2)
y2 = client.infer("dense", [inp2]).as_numpy("y")
want2 = reference.run(None, {"x": x2})[0]
check("finite rows beside NaN/Inf rows", np.allclose(y2[2:], want2[2:], atol=1e-4), (y2, want2))
check("NaN/Inf rows are not finite", not np.isfinite(y2[:2]).all() and not np.isfinite(want2[:2]).all(), y2)

# Versions honoured and unknown outputs refused.
refused("unknown version infer", lambda: client.infer("dense", [inp], model_version="9.9.9"), "9.9.9")
refused("shadow version infer", lambda: client.infer("dense", [inp], model_version="2.0.0"), "shadow")
refused(
    "unknown output",
    lambda: client.infer("dense", [inp], outputs=[httpclient.InferRequestedOutput("nope")]),
    "no output",
)

# JSON both ways still works (binary_data=False).
inp3 = httpclient.InferInput("x", list(x.shape), "FP32")
inp3.set_data_from_numpy(x, binary_data=False)
r = client.infer("dense", [inp3], outputs=[httpclient.InferRequestedOutput("y", binary_data=False)])
check("json infer", np.allclose(r.as_numpy("y"), want, atol=1e-4) and "data" in r.get_output("y"))

print(json.dumps({"checks": passed}))
