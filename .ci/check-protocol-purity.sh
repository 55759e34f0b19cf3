#!/usr/bin/env bash
# Architecture invariant: drover-protocol does no I/O. Its dependency tree may not
# contain an async runtime, MQTT, SQLite, tract, sysinfo or HTTP crates.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(cargo tree -p drover-protocol -e normal --prefix none)
bad=$(grep -E '^(tokio|rumqtt|rusqlite|libsqlite3|tract|sysinfo|axum|hyper|reqwest|mio|rand|getrandom) ' <<<"$tree" || true)
if [[ -n "$bad" ]]; then
  echo "drover-protocol must stay free of I/O crates, found:" >&2
  echo "$bad" >&2
  exit 1
fi
# No clock or environment either.
if grep -rnE 'SystemTime|Instant::now|std::env::|std::fs|std::net' protocol/src; then
  echo "drover-protocol must not read the clock, the environment, files or sockets" >&2
  exit 1
fi
echo "protocol purity: ok ($(wc -l <<<"$tree") crates)"
# Issue 25: the device agent, as shipped (`cargo build -p drover-agent`, what cross/ builds),
# runs compiled models only: no ONNX importer, no protobuf.
agent=$(cargo tree -p drover-agent -e normal --prefix none)
bad=$(grep -E '^(tract-onnx|tract-hir|prost) ' <<<"$agent" || true)
if [[ -n "$bad" ]]; then
  echo "drover-agent as shipped must not link the ONNX importer, found:" >&2
  echo "$bad" >&2
  exit 1
fi
echo "agent runtime: ok (no ONNX importer)"
