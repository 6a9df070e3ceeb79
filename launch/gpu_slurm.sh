#!/usr/bin/env bash
# Submits a config to a Slurm GPU cluster: one process per node, all local
# GPUs per process; jax.distributed reads the Slurm environment.
#
#   launch/gpu_slurm.sh NODES configs/dense_gpt2_124m.py [--dry_run] [-- --config.FIELD=V ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,6p' "$0"; exit 2
fi
nodes=$1 config=$2; shift 2
dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
[[ "${1:-}" == "--" ]] && shift
workdir=${WORKDIR:-runs/$(basename "$config" .py)}
script="pip install -q -r requirements.txt 'jax[cuda12]==0.10.2' && \
SPARSE_GPT2_DISTRIBUTED=1 python -m sparse_gpt2.main --config=$config --workdir=$workdir $*"
cmd=(sbatch --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node=8
     --wrap="srun bash -c \"$script\"")
if (( dry_run )); then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
