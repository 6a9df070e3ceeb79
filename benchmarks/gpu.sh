#!/usr/bin/env bash
# GPU check: the GPT-2 124M twins (bf16 compute, the configs' own batch of
# 512 x 1024 tokens in 8 microbatches) trained for a few steps each through
# the real entry point (corpus build, sharding, checkpoint included), and the
# dense twin once more with XLA's attention in place of cuDNN's fused kernel.
# Per run: tokens/s and step time (medians over the logged intervals after
# the first, which holds compilation), MFU against the card's datasheet bf16
# peak (what the logs show) and against a bf16 matmul timed here, the
# devices' peak memory, the last loss; and the sparse/dense step-time ratio.
# Sized for about 5 minutes on one H200; needs this project's requirements
# and a CUDA jax (`pip install -r requirements.txt 'jax[cuda12]==0.10.2'`, as
# launch/gpu_slurm.sh does; the README's H200 numbers ran on that machine's
# own jax 0.11.2 with CUDA 13).
#
#   benchmarks/gpu.sh                 # STEPS=25, results in benchmarks/out
#   OUT_DIR=/tmp/o EXTRA='--config.model.num_layers=2' benchmarks/gpu.sh
#   STEPS=10 RUNS='sparse_gpt2_paper|sparse_gpt2_paper|' benchmarks/gpu.sh
#   RUN_TIMEOUT=900 benchmarks/gpu.sh # seconds one run may take (300)
#
# Writes gpu.json and gpu.md (and each run's log) to OUT_DIR (a relative one
# from the caller's folder); a run that fails does not stop the others, but
# the script then exits 1, naming it.
set -uo pipefail
# Its settings are the environment variables above: an argument (--help, or
# a --config.FIELD=V meant for EXTRA) was ignored, and the full check ran.
if (( $# )); then
  [[ $1 == -h || $1 == --help ]] && { sed -n '2,22p' "$0"; exit 0; }
  echo "error: gpu.sh takes no arguments, got $1: set STEPS, RUNS, EXTRA," \
    "RUN_TIMEOUT or OUT_DIR instead (--help)" >&2
  exit 2
fi
root=$(realpath "$(dirname "$0")/..")
# Resolved before the cd: OUT_DIR=o names ./o, not the repository's o.
out=$(realpath -m "${OUT_DIR:-$root/benchmarks/out}")
cd "$root" || exit 1
steps=${STEPS:-25} extra=${EXTRA:-}
if ! made=$(mkdir -p -- "$out" 2>&1); then
  echo "error: OUT_DIR $out: ${made#mkdir: }" >&2
  exit 1
fi
runs=$(mktemp -d) || exit 1
trap 'rm -rf "$runs"' EXIT  # Also when a step below exits early.
python3 - "$out/peak.json" <<'PY'
import json, sys
import jax
from sparse_gpt2 import metrics
devices = jax.devices()
print(len(devices), 'x', devices[0].device_kind, '| jax', jax.__version__)
n = 8192 if devices[0].platform != 'cpu' else 1024  # CPU: a smoke run.
timed = metrics.measure_peak_flops('bfloat16', n=n, repeats=10)
print(f'bf16 {n}^3 matmul, fastest of 10: {timed / 1e12:.1f} TFLOP/s')
with open(sys.argv[1], 'w') as f:
  json.dump({'device': devices[0].device_kind, 'devices': len(devices),
             'jax': jax.__version__, 'timed_bf16_flops': timed * len(devices),
             'logged_peak_flops': metrics.peak_flops('bfloat16')}, f)
PY
(( PIPESTATUS[0] == 0 )) || { echo 'error: the matmul peak failed (above)' >&2; exit 1; }
failed=()
# name|config|flags. The dense twin first: it builds the corpus and the
# tokenizer, which the other runs reuse.
default_runs="dense_gpt2_124m|dense_gpt2_124m|
sparse_gpt2_124m|sparse_gpt2_124m|
dense_gpt2_124m_xla_attention|dense_gpt2_124m|--config.model.attention=xla"
while IFS= read -r run; do
  IFS='|' read -r name config flags <<<"$run"
  start=$(date +%s)
  # shellcheck disable=SC2086  # flags and extra are lists of flags.
  timeout "${RUN_TIMEOUT:-300}" python3 -m sparse_gpt2.main \
    --config="configs/$config.py" --workdir="$runs/$name" \
    --config.train_steps="$steps" --config.log_every=5 \
    --config.eval_every="$steps" --config.eval_batches=1 \
    --config.checkpoint_every="$steps" $flags $extra 2>&1 | tee "$out/$name.log"
  status=${PIPESTATUS[0]}
  echo "$name: exit $status, $(( $(date +%s) - start )) s in all" \
    | tee -a "$out/$name.log"
  (( status == 0 )) || failed+=("$name")
done <<<"${RUNS:-$default_runs}"
python3 - "$runs" "$out" "$steps" <<'PY'
import json, os, statistics, sys
from sparse_gpt2 import workdir
runs, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(os.path.join(out, 'peak.json')) as f:
  result = json.load(f)
result.update(steps=steps, runs={})
for name in sorted(os.listdir(runs)):
  lines = workdir.read_metrics(os.path.join(runs, name))
  if not lines:
    continue  # The run failed before its first log: see its log.
  config = workdir.load_config(os.path.join(runs, name))
  timed = lines[1:] or lines  # The first interval holds the warm-up.
  rate = statistics.median(m['tokens_per_s'] for m in timed)
  mfu = statistics.median(m['mfu'] for m in timed)
  result['runs'][name] = {
      'steps': lines[-1]['step'], 'tokens_per_s': rate,
      'step_s': config.batch_size * config.seq_len / rate,
      'mfu_datasheet': mfu,
      'mfu_timed': mfu * result['logged_peak_flops']
                   / result['timed_bf16_flops'],
      'peak_memory_gib': max((m['peak_memory_gib'] for m in lines
                              if 'peak_memory_gib' in m), default=None),
      'loss': lines[-1]['loss']}
r = result['runs']
_gib = lambda b: '-' if b is None else f'{b:.1f} GiB'  # The CPU keeps none.
if 'dense_gpt2_124m' in r and 'sparse_gpt2_124m' in r:
  result['sparse_over_dense_step_time'] = (
      r['sparse_gpt2_124m']['step_s'] / r['dense_gpt2_124m']['step_s'])
with open(os.path.join(out, 'gpu.json'), 'w') as f:
  json.dump(result, f, indent=2)
lines = [f"{result['devices']} x {result['device']}, jax {result['jax']}, "
         f"{steps} steps a run; bf16 matmul timed at "
         f"{result['timed_bf16_flops'] / 1e12:.0f} TFLOP/s, datasheet "
         f"{result['logged_peak_flops'] / 1e12:.0f}.", '',
         '| run | step | tokens/s | MFU (datasheet) | MFU (timed matmul) '
         '| peak memory | loss |', '|---|---:|---:|---:|---:|---:|---:|']
for name, m in r.items():
  if m['steps'] < steps:  # Stopped early (its log says why).
    name += f" (stopped at step {m['steps']})"
  lines.append(f"| {name} | {m['step_s']:.3f} s | {m['tokens_per_s']:,.0f} "
               f"| {100 * m['mfu_datasheet']:.1f}% "
               f"| {100 * m['mfu_timed']:.1f}% "
               f"| {_gib(m['peak_memory_gib'])} | {m['loss']:.3f} |")
if 'sparse_over_dense_step_time' in result:
  lines.append(f"\nsparse/dense step time: "
               f"{result['sparse_over_dense_step_time']:.2f}x")
with open(os.path.join(out, 'gpu.md'), 'w') as f:
  f.write('\n'.join(lines) + '\n')
print('\n'.join(lines))
PY
if (( ${#failed[@]} )); then
  echo "error: failed: ${failed[*]} (their logs are in $out)" >&2
  exit 1
fi
