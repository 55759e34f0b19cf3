#!/usr/bin/env python3
"""End-to-end check of cross-built agents under qemu-user against a native `drover serve`.

Flow per agent: enroll (CLI), start under qemu on loopback, wait online, publish the dense_v1
fixture once, deploy it, wait active, infer over the agent's KServe v2 API and compare with
onnxruntime's reference (1e-4), wait for a telemetry row counting the inference, and read the
RSS of the emulated agent with the model loaded.

Stdlib only, loopback only, port 0 everywhere, bounded by --timeout; every child is killed on
exit. Exit status 0 only if every agent passed.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "agent", "tests", "fixtures")

# qemu-user runner per Rust target; None means run natively. No `-L /usr/<triple>`: the Debian
# cross libc there (2.36-8cross1) hangs (aarch64) or segfaults (armhf) in the first pthread_create
# under qemu 7.2; the multiarch libc6:arm64/armhf (same version as the host's) works, and qemu finds
# its loader at /lib/ld-linux-*.so.* by default.
RUNNERS = {
    "aarch64-unknown-linux-gnu": ["qemu-aarch64-static"],
    "armv7-unknown-linux-gnueabihf": ["qemu-arm-static"],
    "x86_64-unknown-linux-gnu": None,
}
TOLERANCE = 1e-4


class Failure(Exception):
    pass


def log(msg):
    print(f"[qemu-e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_until(what, timeout, fn, interval=0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # a not-yet-ready peer is expected while waiting
            last = e
        time.sleep(interval)
    raise Failure(f"timed out after {timeout}s waiting for {what} (last error: {last})")


def http_json(method, url, body=None, token=None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def vm_status(pid):
    """VmRSS / VmHWM in KiB of a process (here the qemu process: an upper bound for the agent)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


class Procs:
    def __init__(self):
        self.children = []

    def spawn(self, name, argv, logdir, capture_stdout=False):
        err = open(os.path.join(logdir, f"{name}.stderr"), "wb")
        out = subprocess.PIPE if capture_stdout else open(os.path.join(logdir, f"{name}.stdout"), "wb")
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        self.children.append((name, p))
        return p

    def cleanup(self):
        for _, p in self.children:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for _, p in self.children:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def read_api_addr(proc, timeout, sink):
    """The agent prints `api_addr=HOST:PORT` on stdout once its listener is bound."""
    found = {}
    ev = threading.Event()

    def pump():
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            sink.write(line)
            sink.flush()
            if line.startswith("api_addr=") and not ev.is_set():
                found["addr"] = line.strip().split("=", 1)[1]
                ev.set()
        ev.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ev.wait(timeout) or "addr" not in found:
        raise Failure(f"agent did not print api_addr= within {timeout}s (exit={proc.poll()})")
    return found["addr"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drover", required=True, help="native `drover` binary")
    ap.add_argument("--agent", action="append", required=True, metavar="TARGET=PATH",
                    help="agent binary per Rust target (repeatable)")
    ap.add_argument("--timeout", type=float, default=240, help="wait bound per step, seconds")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs) on success")
    ap.add_argument("--json", help="write the per-agent results here")
    args = ap.parse_args()

    agents = []
    for spec in args.agent:
        target, _, path = spec.partition("=")
        if target not in RUNNERS or not path:
            ap.error(f"bad --agent {spec!r}; targets: {', '.join(RUNNERS)}")
        runner = RUNNERS[target]
        if runner and not shutil.which(runner[0]):
            ap.error(f"{runner[0]} not found (apt-get install qemu-user-static)")
        agents.append((target, os.path.abspath(path), runner))

    tmp = tempfile.mkdtemp(prefix="drover-qemu-e2e-")
    procs = Procs()
    ok = False
    results = []
    try:
        ok, results = run(args, agents, tmp, procs)
    except Failure as e:
        log(f"FAIL: {e}")
    finally:
        procs.cleanup()
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"logs kept in {tmp}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    for r in results:
        log(json.dumps(r))
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


def run(args, agents, tmp, procs):
    t = args.timeout
    sdir = os.path.join(tmp, "server")
    procs.spawn("serve", [args.drover, "serve", "--data-dir", sdir,
                          "--http-listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"], tmp)

    def server_ready():
        url = open(os.path.join(sdir, "api-url")).read().strip()
        token = open(os.path.join(sdir, "api-token")).read().strip()
        return (url, token) if url and token else None

    url, token = wait_until("drover serve to write api-url/api-token", 60, server_ready)
    log(f"drover serve at {url}")
    srv = ["--server", url, "--token", token]

    def cli(*a):
        r = subprocess.run([args.drover, *a, *srv], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise Failure(f"drover {' '.join(a)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def devices():
        return {d["id"]: d for d in json.loads(cli("device", "list", "--output", "json") or "[]")}

    running = []
    for target, path, runner in agents:
        dev = "cross-" + target.split("-")[0]
        cfg = os.path.join(tmp, f"{dev}.toml")
        cli("device", "enroll", dev, "--label", f"arch={target.split('-')[0]}", "--out", cfg)
        extra = []
        if runner:
            # qemu-user cannot execve a foreign binary without binfmt_misc, so the agent's
            # isolated self-test child (runtime.isolate) runs through a wrapper that starts it
            # under the same qemu. qemu-user ignores the child's RLIMIT_AS.
            loader = os.path.join(tmp, f"{dev}-loader.sh")
            with open(loader, "w") as f:
                f.write(f"#!/bin/sh\nexec {' '.join(runner)} {os.path.abspath(path)} \"$@\"\n")
            os.chmod(loader, 0o755)
            extra = ["--set", f"runtime.loader_exe={loader}"]
        argv = (runner or []) + [path, "--config", cfg, "--data-dir", os.path.join(tmp, f"{dev}-data"),
                                 "--api-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--set", "telemetry.interval_ms=300",
                                 *extra, "run"]
        p = procs.spawn(dev, argv, tmp, capture_stdout=True)
        sink = open(os.path.join(tmp, f"{dev}.stdout"), "w")
        t0 = time.monotonic()
        addr = read_api_addr(p, t, sink)
        log(f"{dev}: agent up at {addr} after {time.monotonic() - t0:.1f}s (pid {p.pid})")
        running.append({"target": target, "device": dev, "proc": p, "addr": addr})

    wait_until("all devices online", t,
               lambda: all(devices().get(a["device"], {}).get("online") is True for a in running))
    log("all devices online")

    published = json.loads(cli("model", "publish", os.path.join(FIXTURES, "dense_v1.onnx"),
                               "--name", "dense", "--version", "1.0.0", "--output", "json"))
    if published.get("version") != "1.0.0":
        raise Failure(f"unexpected publish output {published}")
    for a in running:
        cli("device", "deploy", a["device"], "--model", "dense@1.0.0")
    t0 = time.monotonic()
    wait_until("dense@1.0.0 active on every device", t,
               lambda: all("1.0.0" in (devices().get(a["device"], {}).get("active_model") or "")
                           for a in running), interval=0.5)
    log(f"dense@1.0.0 active everywhere after {time.monotonic() - t0:.1f}s")

    ref = json.load(open(os.path.join(FIXTURES, "dense_v1.json")))
    inp = ref["inputs"][0]
    want = ref["outputs"][0]["data"]
    body = {"id": "qemu-e2e", "inputs": [{"name": inp["name"], "shape": inp["shape"],
                                          "datatype": "FP32", "data": inp["data"]}]}
    results = []
    all_ok = True
    for a in running:
        r = {"target": a["target"], "device": a["device"]}
        try:
            t0 = time.monotonic()
            resp = wait_until(f"{a['device']} answers inference", t,
                              lambda: http_json("POST", f"http://{a['addr']}/v2/models/dense/infer", body))
            r["infer_ms_first"] = round((time.monotonic() - t0) * 1000)
            t0 = time.monotonic()
            http_json("POST", f"http://{a['addr']}/v2/models/dense/infer", body)
            r["infer_ms"] = round((time.monotonic() - t0) * 1000, 1)
            got = resp["outputs"][0]["data"]
            if len(got) != len(want):
                raise Failure(f"{a['device']}: {len(got)} outputs, want {len(want)}")
            diff = max(abs(g - w) for g, w in zip(got, want))
            r["max_abs_diff"] = diff
            if diff >= TOLERANCE:
                raise Failure(f"{a['device']}: outputs {got} differ from onnxruntime {want} by {diff}")
            tele = f"{url}/v1/devices/{a['device']}/telemetry"
            wait_until(f"telemetry counting an inference from {a['device']}", t,
                       lambda: any((row.get("inferences") or 0) > 0 for row in http_json("GET", tele, token=token)),
                       interval=0.5)
            r["telemetry"] = True
            r.update({k + "_kib": v for k, v in vm_status(a["proc"].pid).items()})
            r["pass"] = True
        except Failure as e:
            log(f"FAIL: {e}")
            r["pass"] = False
            r["error"] = str(e)
            all_ok = False
        results.append(r)
    return all_ok, results


if __name__ == "__main__":
    sys.exit(main())
