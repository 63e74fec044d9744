#!/usr/bin/env bash
# Early exit against the plain model, for one tuned bundle: in-process (batch 1 and 32, against
# the plain single graph) and over HTTP (an early-exit server and a `--full-model` server side by
# side, passes alternating, concurrency 1 and 32).
#   bash scripts/exits_vs_plain.sh BUNDLE DATA_DIR OUT [PORT]
# Writes OUT/inprocess/bench.json (+ PNGs), OUT/http_c1/ and OUT/http_c32/. Both servers and the
# client use one onnxruntime thread, as the in-process benchmark does, so the ratios compare like
# with like on a small host. SKIP_INPROCESS=1 keeps an existing OUT/inprocess and runs only HTTP.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: bash scripts/exits_vs_plain.sh BUNDLE DATA_DIR OUT [PORT]" >&2
    exit 2
fi
bundle=$1
data=$2
out=$3
port=${4:-18300}
export OMP_NUM_THREADS=1
mkdir -p "$out"

if [ "${SKIP_INPROCESS:-0}" != 1 ]; then
    earlyexit-bench --bundle "$bundle" --dataset cifar10 --data-dir "$data" --split test \
        --batch-sizes 1,32 --threads 1 --out "$out/inprocess" --json > "$out/inprocess.json"
fi

state=$(mktemp -d)
earlyexit-serve --bundle "$bundle" --port "$port" --providers cpu --intra-op-threads 1 \
    --no-access-log --state-dir "$state/ee" > "$state/server_early_exit.log" 2>&1 &
ee_pid=$!
earlyexit-serve --bundle "$bundle" --full-model --port $((port + 1)) --providers cpu \
    --intra-op-threads 1 --no-access-log --state-dir "$state/plain" > "$state/server_plain.log" 2>&1 &
plain_pid=$!
trap 'kill "$ee_pid" "$plain_pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$state"' EXIT
for p in "$port" $((port + 1)); do
    for _ in $(seq 1 120); do
        if curl -fsS "http://127.0.0.1:$p/readyz" > /dev/null 2>&1; then break; fi
        sleep 1
    done
    if ! curl -fsS "http://127.0.0.1:$p/readyz" > /dev/null 2>&1; then
        echo "server on port $p did not become ready:" >&2
        cat "$state"/server_*.log >&2
        exit 1
    fi
done

for c in 1 32; do
    earlyexit-bench --http "http://127.0.0.1:$port" --compare-url "http://127.0.0.1:$((port + 1))" \
        --dataset cifar10 --data-dir "$data" --limit 1000 --concurrency "$c" --duration 15 \
        --pairs 3 --local-bundle "$bundle" --threads 1 --server-pid "$ee_pid" --json \
        --out "$out/http_c$c" > "$out/http_c$c.json"
done
