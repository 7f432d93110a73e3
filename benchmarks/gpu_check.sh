#!/usr/bin/env bash
# The GPU check in one command (issue 17): at most 8 minutes on one GPU. It runs
#   1. the test suite with D3SR_TEST_DEVICE=cuda (tests that take a device use it; the rest run on the CPU),
#   2. d3sr bench --arch sd21 --device cuda, ours in bf16 and in fp16 against the fp16 reference, 512 and 2048 px out,
#   3. the peak GPU memory of both paths at a 4096 px output (bf16),
#   4. one tiny training run of each one-step method with mixed precision (bf16),
# and writes gpu_check.json (every step: command, exit status, seconds, its report) and gpu_check.md (the table)
# into benchmarks/ (or --out DIR).
#
#   benchmarks/gpu_check.sh             # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --dry-run   # the same steps on the CPU: tiny models, small sizes, fp32 (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
out=benchmarks
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1; expected --dry-run or --out DIR." >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
steps="$work/steps.jsonl"
: > "$steps"

if [ "$dry" = 1 ]; then
  # fp32: half precision on the CPU runs emulated, minutes for what takes seconds in fp32.
  device=cpu; arch=tiny; sizes="16 32"; big=64; precision=no; name=gpu_check_dry; dtypes="fp32"; big_dtype=fp32
  tests=(tests/test_tiling.py tests/test_winograd.py)
else
  device=cuda; arch=sd21; sizes="128 512"; big=1024; precision=bf16; name=gpu_check; dtypes="bf16 fp16"; big_dtype=bf16
  tests=(tests)
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check.sh: no CUDA GPU is visible to torch; run with --dry-run on a CPU." >&2; exit 1; }
fi

# step NAME REPORT_FILE_OR_- TIMEOUT_S COMMAND...: runs it, records exit status, seconds and the report it wrote.
step() {
  local label="$1" report="$2" limit="$3"; shift 3
  local start rc
  echo "== $label: $*"
  start=$(date +%s.%N)
  timeout "$limit" "$@" > "$work/$label.log" 2>&1
  rc=$?
  tail -n 5 "$work/$label.log"
  python - "$label" "$report" "$rc" "$start" "$work/$label.log" "$@" >> "$steps" <<'PY'
import json, sys, time
label, report, rc, start, log, *command = sys.argv[1:]
entry = {"step": label, "command": " ".join(command), "rc": int(rc), "seconds": round(time.time() - float(start), 1)}
if report != "-":
    try:
        with open(report) as f:
            entry["report"] = json.load(f)
    except (OSError, ValueError):
        entry["report"] = None
with open(log, errors="replace") as f:
    entry["log_tail"] = f.read()[-2000:]
print(json.dumps(entry))
PY
}

photos="$work/photos"
# Four smooth random training photos (numpy + PIL only: importing torch here would cost as much as a step).
python -c "
import numpy as np, os
from PIL import Image
os.makedirs('$photos', exist_ok=True)
g = np.random.default_rng(0)
for i in range(4):
    small = g.random((6, 6, 3))
    big = np.kron(small, np.ones((22, 22, 1)))[:128, :128]
    Image.fromarray((big * 255).astype(np.uint8)).save(f'$photos/img{i}.png')"

D3SR_TEST_DEVICE=$device step tests - 300 python -m pytest -q -x "${tests[@]}"
for dtype in $dtypes; do
  step "bench_$dtype" "$work/bench_$dtype.json" 150 d3sr bench --arch $arch --sizes $sizes --repeats 3 --warmup 1 \
    --device $device --dtype $dtype --json "$work/bench_$dtype.json"
done
step bench_4k "$work/bench_4k.json" 120 d3sr bench --arch $arch --sizes $big --repeats 1 --warmup 0 --device $device \
  --dtype $big_dtype --json "$work/bench_4k.json"
for method in d3sr osediff tadsr tsdsr; do
  step "train_$method" - 90 d3sr train --method $method --preset tiny --data "$photos" --max-steps 2 \
    --output-dir "$work/train_$method" --set train.mixed_precision=$precision --set train.batch_size=1 \
    --set train.checkpoint_every=2
done

python - "$steps" "$out/$name.json" "$out/$name.md" "$dry" <<'PY'
import json, platform, sys, time
import torch
steps_file, json_path, md_path, dry = sys.argv[1:]
steps = [json.loads(line) for line in open(steps_file)]
device = "cpu (dry run)" if dry == "1" else torch.cuda.get_device_name(0)
summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "torch": torch.__version__,
           "python": platform.python_version(), "dry_run": dry == "1", "steps": steps}
with open(json_path, "w") as f:
    json.dump(summary, f, indent=2)
lines = [f"GPU check on {device}, torch {torch.__version__}, {summary['date']}", "",
         "| step | exit | seconds | result |", "|---|---|---|---|"]
for s in steps:
    result = ""
    report = s.get("report")
    if report:
        parts = []
        for r in report.get("ratios", []):
            ref = next(x for x in report["results"] if x["path"] == "reference" and x["input_size"] == r["input_size"])
            ours = next(x for x in report["results"] if x["path"] == "ours" and x["input_size"] == r["input_size"])
            parts.append(f"{ref['output_size']} px: reference ({report['reference_dtype']}) {ref['median_seconds'] * 1000:.0f} ms / "
                         f"{ref['peak_mib']:.0f} MiB, ours ({report['dtype']}) {ours['median_seconds'] * 1000:.0f} ms / "
                         f"{ours['peak_mib']:.0f} MiB, {r['speedup']:.2f}x")
        result = "; ".join(parts)
    lines.append(f"| {s['step']} | {s['rc']} | {s['seconds']} | {result} |")
with open(md_path, "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
failed = [s["step"] for s in steps if s["rc"] != 0]
sys.exit(1 if failed else 0)
PY
