#!/usr/bin/env bash
# Runs a config on every host of a TPU VM slice (one process per host; JAX
# finds the other hosts itself).
#
#   launch/tpu_vm.sh NAME ZONE configs/sparse_gpt2_124m.py [--dry_run] [-- --config.FIELD=V ...]
#
# The repo is copied to each host, requirements installed with TPU jaxlib,
# and the run writes to --workdir (a gs:// path works with orbax and TFDS).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,9p' "$0"; exit 2
fi
name=$1 zone=$2 config=$3; shift 3
dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
[[ "${1:-}" == "--" ]] && shift
run() { if (( dry_run )); then printf '%q ' "$@"; echo; else "$@"; fi; }

repo=$(cd "$(dirname "$0")/.." && pwd)
workdir=${WORKDIR:-runs/$(basename "$config" .py)}
run gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all \
  "$repo" "$name":~/sparse_gpt2
run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command \
  "cd ~/sparse_gpt2 && pip install -q -r requirements.txt 'jax[tpu]==0.10.2' \
   && SPARSE_GPT2_DISTRIBUTED=1 python -m sparse_gpt2.main --config=$config --workdir=$workdir $*"
