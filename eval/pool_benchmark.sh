#!/usr/bin/env bash
# The engine-pool benchmark of issue 15: throughput and p95 delay at one offered load for one
# engine, and two engines with best-fit across them, round-robin and least-loaded placement;
# then the same with a skewed pool (the second engine's KV cache much smaller), where best-fit
# must beat load-only routing. Starts its own vLLM servers on 127.0.0.1 (one or two at a time)
# and stops them at the end.
#
#   eval/pool_benchmark.sh [DATASET] [OUT]
#   env: LIMIT (queries per run, default 24); RATE (q/s offered, default 0.5); SMALL_BLOCKS (the
#   skewed engine's KV blocks, default 40: the 4,096-token context plus little more, so that memory
#   binds there); ROUNDS (skewed-pool rounds, default 1: round 2 runs the placements in reverse
#   order, as NAME-2, so that no placement always runs first after a warm-up); POOLS (which
#   pools to run: equal, skewed or both, default equal,skewed); MODEL (an HF
#   folder; default: the embedded model);
#   PYTHON (default python3); RAGCTL (default ragctl)
set -euo pipefail
dataset=${1:-squad}
out=${2:-eval/out/pool-$dataset}
limit=${LIMIT:-24}
rate=${RATE:-0.5}
small=${SMALL_BLOCKS:-40}
rounds=${ROUNDS:-1}
pools=${POOLS:-equal,skewed}
python=${PYTHON:-python3}
ragctl=${RAGCTL:-ragctl}
model=${MODEL:-$($python -c 'from ragctl.engine.embedded_model import resolve_model
from ragctl.settings import Settings
s = Settings(); print(resolve_model(s.model, s.cache_dir))')}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_NUM_OF_RESERVED_CPU=0
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null || true; done; }
trap cleanup EXIT

start_server() {  # PORT [extra vLLM flags...]: start a vLLM server, wait for /health
  local port=$1; shift
  setsid $python -m vllm.entrypoints.openai.api_server --model "$model" \
    --served-model-name ragctl-bench --host 127.0.0.1 --port "$port" --dtype float32 \
    --max-model-len 4096 --enforce-eager "$@" >"$out/vllm-$port.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
    sleep 1
  done
  echo "vLLM on port $port did not start; see $out/vllm-$port.log" >&2
  exit 1
}

run() {  # NAME GLOBAL-OPTIONS...: one eval run of ragctl at the offered rate
  local name=$1; shift
  if [ ! -f "$out/$name/results.json" ]; then
    $ragctl "$@" eval run --dataset "$dataset" --systems ragctl --limit "$limit" --rate "$rate" \
      --seed 1 --out "$out/$name"
  fi
}

warm() {  # URL...: a few queries on each new server first, discarded: on the CPU engine the
  # first occurrences of new shapes are slow, and the first placement run must not pay for them
  local u
  for u in "$@"; do
    $ragctl --engine-url "$u" eval run --dataset "$dataset" --systems ragctl --limit 8 \
      --concurrency 2 --seed 9 --out "$out/warmup/$(basename "$u")" >/dev/null
  done
}

a=http://127.0.0.1:8101 b=http://127.0.0.1:8102 c=http://127.0.0.1:8103
start_server 8101
warm "$a"
if [[ ,$pools, == *,equal,* ]]; then
  start_server 8102
  warm "$b"
  run one-engine --engine-url "$a"
  for p in best-fit round-robin least-loaded; do
    run "two-$p" --engine-url "$a" --engine-url "$b" --placement "$p"
  done
  kill -- -"${pids[-1]}"; sleep 5
fi
if [[ ,$pools, == *,skewed,* ]]; then
  # The skewed pool: the second engine has a small KV cache.
  start_server 8103 --num-gpu-blocks-override "$small"
  warm "$c"
  order="best-fit round-robin least-loaded"
  for r in $(seq "$rounds"); do
    suffix=$([ "$r" -gt 1 ] && echo "-$r" || true)
    for p in $order; do
      run "skewed-$p$suffix" --engine-url "$a" --engine-url "$c" --placement "$p"
    done
    order=$(echo "$order" | tr ' ' '\n' | tac | tr '\n' ' ')
  done
fi

$python - "$out" <<'EOF'
import json, sys
from collections import Counter
from pathlib import Path

root = Path(sys.argv[1])
print(f"{'run':<22} {'answered':>8} {'errors':>6} {'q/s':>7} {'mean s':>7} {'p50 s':>6} "
      f"{'p95 s [95% CI]':>18} {'quality':>8} {'evidence':>8} {'placed':>9}  configurations")
for d in sorted(p for p in root.iterdir() if (p / "results.json").is_file()):  # not warmup/
    res = json.loads((d / "results.json").read_text())
    s = next(iter(res["rates"].values()))["systems"]["ragctl"]
    lo, hi = s.get("delay_p95_s_ci") or (float("nan"), float("nan"))
    q = s.get("quality", {})
    engines = Counter(json.loads(line).get("decision", {}).get("engine") or "-"
                      for line in (d / "samples.jsonl").read_text().splitlines() if line.strip())
    placed = "/".join(str(engines[e]) for e in sorted(engines))
    configs = ", ".join(f"{k} x{v}" for k, v in sorted(s.get("configs", {}).items(),
                                                       key=lambda kv: -kv[1]))
    print(f"{d.name:<22} {s.get('answered', '-'):>8} {s.get('errors', 0):>6} "
          f"{s['throughput_qps']:>7.3f} {s['delay_mean_s']:>7.2f} "
          f"{s.get('delay_p50_s', float('nan')):>6.2f} "
          f"{s['delay_p95_s']:>6.2f} [{lo:.2f}, {hi:.2f}] "
          f"{s.get('primary_value') or 0:>8.3f} {q.get('evidence_recall', 0):>8.3f} {placed:>9}  {configs}")
EOF
