#!/usr/bin/env bash
# GPU readiness check: GPT-2 124M dense and sparse (bf16 compute) trained for
# a fixed number of steps on this machine's GPUs through the real entry point
# (data, sharding, checkpoint included), then tokens/s, MFU against the
# card's datasheet bf16 peak (sparse_gpt2/metrics.py), and the sparse/dense
# step-time ratio. Sized for under 5 minutes on one H200, corpus build
# included; needs `pip install -r requirements.txt 'jax[cuda12]==0.10.2'`.
#
#   benchmarks/gpu.sh            # STEPS=100 BATCH=32 (x 1024 tokens) by default
#
# Writes benchmarks/out/gpu.json and gpu.md; rates are medians over the
# logged intervals after the first (which holds compilation).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${STEPS:-100} batch=${BATCH:-32}
runs=$(mktemp -d)
python -c 'import jax; d = jax.devices(); print(len(d), "x", d[0].device_kind)'
for name in dense_gpt2_124m sparse_gpt2_124m; do
  start=$(date +%s)
  python -m sparse_gpt2.main --config="configs/$name.py" \
    --workdir="$runs/$name" --config.train_steps="$steps" \
    --config.batch_size="$batch" --config.log_every=10 \
    --config.eval_every="$steps" --config.eval_batches=1 \
    --config.checkpoint_every="$steps"
  echo "$name: $(( $(date +%s) - start )) s in all"
done
python - "$runs" <<'PY'
import json, os, statistics, sys
runs, out = sys.argv[1], 'benchmarks/out'
result = {}
for name in ('dense_gpt2_124m', 'sparse_gpt2_124m'):
  with open(os.path.join(runs, name, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f][1:]  # The first compiles.
  result[name] = {
      'tokens_per_s': statistics.median(m['tokens_per_s'] for m in logged),
      'mfu': statistics.median(m['mfu'] for m in logged),
      'final_loss': logged[-1]['loss']}
result['sparse_over_dense_step_time'] = (
    result['dense_gpt2_124m']['tokens_per_s']
    / result['sparse_gpt2_124m']['tokens_per_s'])
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, 'gpu.json'), 'w') as f:
  json.dump(result, f, indent=2)
lines = ['| run | tokens/s | MFU (bf16 peak) | loss |', '|---|---:|---:|---:|']
for name in ('dense_gpt2_124m', 'sparse_gpt2_124m'):
  r = result[name]
  lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% "
               f"| {r['final_loss']:.3f} |")
lines.append(f"\nsparse/dense step time: "
             f"{result['sparse_over_dense_step_time']:.2f}x")
with open(os.path.join(out, 'gpu.md'), 'w') as f:
  f.write('\n'.join(lines) + '\n')
print('\n'.join(lines))
PY
rm -rf "$runs"
