#!/usr/bin/env bash
# Submits a training run to a Slurm GPU cluster: whole nodes, one process per
# node driving all its GPUs, jax.distributed coordinated by the first node.
#
#   launch/gpu_slurm.sh [--dry_run] NODES CONFIG [--time=HH:MM:SS]
#       [--gpus_per_node=8] [--partition=P] [--workdir=DIR] [-- --config.FIELD=V ...]
#
# The batch script installs requirements (with CUDA jaxlib) once, into
# .venv of this checkout, which every node must see (a shared filesystem, as
# is usual for Slurm); then `srun` starts one process per node. The log of
# all processes goes to logs/JOBNAME-JOBID.out. --workdir defaults to
# runs/CONFIG_NAME in this checkout, also on the shared filesystem.
# --dry_run prints the batch script and the sbatch command instead.
set -euo pipefail
usage() { sed -n '2,13p' "$0"; exit 2; }

dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
[[ $# -lt 2 ]] && usage
nodes=$1 config=$2; shift 2
time_limit=24:00:00 gpus=8 partition='' workdir='' overrides=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --time=*) time_limit=${1#*=} ;;
    --gpus_per_node=*) gpus=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --workdir=*) workdir=${1#*=}
      # As main refuses it: an unset $DIR in --workdir=$DIR is not the default.
      [[ -n $workdir ]] || {
        echo "error: --workdir is empty; leave it out for runs/CONFIG_NAME" >&2
        exit 2; } ;;
    --) shift; overrides=("$@"); break ;;
    *) echo "error: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
repo=$(cd "$(dirname "$0")/.." && pwd)
[[ $nodes =~ ^[1-9][0-9]*$ ]] || {
  echo "error: NODES must be a positive integer, got '$nodes'" >&2; exit 2; }
[[ $gpus =~ ^[1-9][0-9]*$ ]] || {
  echo "error: --gpus_per_node must be a positive integer, got '$gpus'" >&2
  exit 2; }
[[ -f "$repo/${config%%:*}" ]] || {
  echo "error: no config file ${config%%:*} in $repo" >&2; exit 2; }
name=$(basename "${config%%:*}" .py)
workdir=${workdir:-runs/$name}
args=(--config="$config" --workdir="$workdir" ${overrides[@]+"${overrides[@]}"})
# A directive's value as sbatch reads it: in double quotes, or a space in the
# checkout's path or the config's name ends it and a `#` starts a comment
# (--output=/home/me/my code/logs/... wrote the log to /home/me/my).
directive() { local v=${1//\\/\\\\}; v=${v//\"/\\\"}; printf '"%s"' "$v"; }
# sbatch reads a `%` in --output's value as the start of a file-name pattern
# (%x, %j, %u...): the checkout path's own are doubled, %% being a plain `%`
# (a checkout in /data/top%jobs logged to /data/top<job id>obs/logs/...).
log=$(directive "${repo//[%]/%%}/logs/%x-%j.out")

script="#!/usr/bin/env bash
#SBATCH --job-name=$(directive "sparse_gpt2-$name")
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --exclusive
#SBATCH --time=$time_limit
#SBATCH --output=$log
${partition:+#SBATCH --partition=$partition
}set -euo pipefail
cd $(printf '%q' "$repo")
# Once, on the first node, before any process starts.
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt 'jax[cuda12]==0.10.2'
# jax.distributed.initialize() reads the process count and ids from Slurm;
# the coordinator is the first node of the job.
export JAX_COORDINATOR_ADDRESS=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1):12345
export SPARSE_GPT2_DISTRIBUTED=1
# Every GPU of the node to its one process: under Slurm jax would otherwise
# give each task only the GPU of its local task id (0).
export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
# Compiled programs kept in the shared checkout: jax writes entries from
# process 0 alone, and every node reads them.
export JAX_COMPILATION_CACHE_DIR=\${JAX_COMPILATION_CACHE_DIR:-$(printf '%q' "$repo")/.jax_cache}
srun --ntasks-per-node=1 .venv/bin/python -m sparse_gpt2.main $(printf '%q ' "${args[@]}")
"

if (( dry_run )); then  # As commands that write the file, then submit it.
  file=$(printf '%q' "$repo/logs/sparse_gpt2-$name.sbatch")
  echo "mkdir -p $(printf '%q' "$repo/logs")"
  echo "cat > $file <<'SBATCH'"
  printf '%s' "$script"
  echo "SBATCH"
  echo "sbatch $file"
else
  mkdir -p "$repo/logs"
  printf '%s' "$script" > "$repo/logs/sparse_gpt2-$name.sbatch"
  sbatch "$repo/logs/sparse_gpt2-$name.sbatch"
fi
