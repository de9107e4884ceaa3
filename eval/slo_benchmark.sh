#!/usr/bin/env bash
# The SLO benchmark of eval/RESULTS.md: measure ragctl's median delay unloaded, set the SLO to
# twice that, then run three arrival rates (light, near capacity, overloaded) with the SLO loop
# off, Patchwork-style (priority + paused admissions), adaptive (+ configuration changes and
# triage) and admission (+ shedding and holding), and print the violation rates and throughput
# side by side.
#
#   eval/slo_benchmark.sh [DATASET] [OUT]
#   env: LIMIT (queries per rate, default 16); RATES (q/s, default: 0.5, 1 and 2 times 1/p50 of
#   the unloaded run; the engine batches, so its real capacity is higher: measure and set them);
#   RATE_FACTORS (the rates as multiples of 1/p50 when RATES is unset, default 0.5,1,2);
#   SEEDS (the loaded runs' query samples and arrival times, default 1; several, e.g. 1,2: each
#   seed's runs go to OUT/sSEED/MODE and the table pools them); UNLOADED (an earlier unloaded
#   run to reuse, default OUT/unloaded); WARMUP (queries answered and discarded after each
#   engine start, before anything is measured, at the cell's rate and SLO, default 24: the
#   delay model needs 8 stages and the records 10 requests; the SLO loop keeps what it learned
#   from them, as a running server would have); COOLDOWN (at most this many other queries go on
#   arriving at the cell's rate after its last measured arrival, until every measured query has
#   finished, unrecorded, default 16: the last measured requests meet a steady stream's load,
#   not an engine the run stops feeding); MODES (the mitigations, off first, default
#   off,patchwork,adaptive,admission); PYTHON (one with ragctl installed, for the pooled
#   table's intervals, default .venv/bin/python)
set -euo pipefail
dataset=${1:-squad}
out=${2:-eval/out/slo-$dataset}
limit=${LIMIT:-16}
seeds=${SEEDS:-${SEED:-1}}
warmup=${WARMUP:-24}
cooldown=${COOLDOWN:-16}
ragctl=${RAGCTL:-ragctl}
unloaded=${UNLOADED:-$out/unloaded}
modes=${MODES:-off,patchwork,adaptive,admission}
case $modes in off|off,*) ;; *) echo "MODES must start with off (the baseline): $modes" >&2; exit 2;; esac

if [ ! -f "$unloaded/results.json" ]; then
  $ragctl eval run --dataset "$dataset" --systems ragctl --limit "$limit" --concurrency 1 \
    --warmup "$warmup" --out "$unloaded"
fi
read -r slo rates < <(python3 - "$unloaded/results.json" "${RATE_FACTORS:-0.5,1,2}" <<'EOF'
import json, sys
phase = next(iter(json.load(open(sys.argv[1]))["rates"].values()))
p50 = phase["systems"]["ragctl"]["delay_p50_s"]
# One query at a time takes p50 seconds: 1/p50 q/s is about what the engine sustains.
capacity = 1 / p50
factors = [float(f) for f in sys.argv[2].split(",")]
print(round(2000 * p50), ",".join(f"{f * capacity:.4f}" for f in factors))
EOF
)
rates=${RATES:-$rates}
echo "SLO ${slo} ms (2x the unloaded median); rates ${rates} q/s"
for seed in ${seeds//,/ }; do
  for mode in ${modes//,/ }; do
    if [ ! -f "$out/s$seed/$mode/results.json" ]; then
      $ragctl eval run --dataset "$dataset" --systems ragctl --limit "$limit" --rate "$rates" \
        --slo-ms "$slo" --slo-mitigation "$mode" --seed "$seed" --warmup "$warmup" \
        --cooldown "$cooldown" --out "$out/s$seed/$mode"
    fi
  done
done
python=${PYTHON:-.venv/bin/python}
"$python" - "$out" "$seeds" "$modes" <<'EOF'
import json, sys
from pathlib import Path

from ragctl.evaluation.intervals import ratio_ci

root = Path(sys.argv[1])
modes = [m.strip() for m in sys.argv[3].split(",") if m.strip()]
seeds = [s.strip() for s in sys.argv[2].split(",") if s.strip()]
runs = {(seed, m): json.loads((root / f"s{seed}" / m / "results.json").read_text())
        for seed in seeds for m in modes}
print(f"{'rate q/s':>9} {'seed':>5} {'mitigation':>10} {'violations':>10} {'rate':>6} {'vs off':>7} "
      f"{'q/s':>6} {'mean s':>7} {'p95 s':>6} {'flagged':>7} {'demoted':>7} {'paused ms':>9} "
      f"{'held ms':>7} plan actions")
def num(x, width):
    """Seconds, or '-' where a cell answered nothing (every request refused)."""
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.2f}"

def misses(seed, mode, rate):
    """{query id: 1 if it missed its SLO (or failed) else 0} of one cell's requests."""
    out = {}
    for line in (root / f"s{seed}" / mode / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("rate") == rate and r.get("slo_ms"):
            met = r.get("error") is None and r["delay_s"] * 1000 <= r["slo_ms"]
            out[r["query_id"]] = 0.0 if met else 1.0
    return out

def paired_ci(mode, rate):
    """95% paired bootstrap interval of mode's violations / off's - 1, pooled over the seeds
    (each request against the same query and arrival under off)."""
    xs, ys = [], []
    for seed in seeds:
        off, m = misses(seed, "off", rate), misses(seed, mode, rate)
        both = sorted(set(off) & set(m))
        xs += [off[q] for q in both]
        ys += [m[q] for q in both]
    ci = ratio_ci(ys, xs)  # the project's paired bootstrap of mean(ys) / mean(xs)
    if ci is None:
        return ""
    return f"[{ci[0] - 1:+.0%}, {ci[1] - 1:+.0%}] paired, n={len(xs)}"

for i, key in enumerate(runs[(seeds[0], "off")]["rates"]):
    pooled = {m: [0, 0] for m in modes}
    for seed in seeds:
        base = runs[(seed, "off")]["rates"][key]["systems"]["ragctl"]
        for mode in modes:
            res = runs[(seed, mode)]
            s = res["rates"][key]["systems"]["ragctl"]
            slo = s["slo"]
            pooled[mode][0] += slo["violations"]
            pooled[mode][1] += slo["requests"]
            cut = slo["violations"] / base["slo"]["violations"] - 1 if base["slo"]["violations"] else 0.0
            actions = ", ".join(f"{k} {v}" for k, v in slo["plan_actions"].items()) or "-"
            print(f"{res['rates'][key]['rate']:>9.4f} {seed:>5} {mode:>10} "
                  f"{slo['violations']:>4}/{slo['requests']:<5} "
                  f"{slo['violation_rate']:>6.0%} {cut:>+7.0%} {s['throughput_qps']:>6.3f} "
                  f"{num(s['delay_mean_s'], 7)} {num(s['delay_p95_s'], 6)} {slo['flagged']:>7} "
                  f"{slo.get('demoted_calls') or 0:>7} {slo['paused_mean_ms'] or 0:>9.0f} "
                  f"{slo.get('held_mean_ms') or 0:>7.0f} {actions}")
    if len(seeds) > 1:
        off = pooled["off"][0]
        for mode in modes:
            v, n = pooled[mode]
            cut = v / off - 1 if off else 0.0
            ci = "" if mode == "off" else paired_ci(mode, runs[(seeds[0], "off")]["rates"][key]["rate"])
            print(f"{'':>9} {'all':>5} {mode:>10} {v:>4}/{n:<5} {v / n:>6.0%} {cut:>+7.0%} {ci}")
def pct(x):
    return "-" if x is None else f"{x:.0%}"
for (seed, mode), res in runs.items():
    mode = f"seed {seed} {mode}"
    meta = res["meta"]["slo"]
    pred = meta["prediction"]
    if pred["n"]:
        print(f"{mode}: the tracker's predictor ({meta.get('predictor', 'averages')}) MAE "
              f"{pred['predictor_mae_s']:.2f} s (MAPE {pred['predictor_mape']:.0%}) vs baseline "
              f"{pred['baseline_mae_s']:.2f} s ({pred['baseline_mape']:.0%}) over {pred['n']} requests")
    if pred.get("paired_n"):
        # Like for like: the requests where the delay model, the running averages and the
        # configuration-blind baseline all predicted.
        print(f"{mode}: MAPE over {pred['paired_n']} requests: delay model "
              f"{pct(pred['paired_model_mape'])}, running averages "
              f"{pct(pred['paired_averages_mape'])}, configuration-blind "
              f"{pct(pred['paired_baseline_mape'])} (model alone {pct(pred['model_mape'])} over "
              f"{pred['model_n']}, averages alone {pct(pred['averages_mape'])} over "
              f"{pred['averages_n']})")
EOF
