#!/usr/bin/env bash
# A training run on a Cloud TPU VM slice, one process per host.
#
#   launch/tpu_vm.sh [--dry_run] create NAME ZONE TYPE [--spot]
#   launch/tpu_vm.sh [--dry_run] start  NAME ZONE CONFIG [--workdir=DIR] [-- --config.FIELD=V ...]
#   launch/tpu_vm.sh [--dry_run] logs   NAME ZONE [--worker=N]
#   launch/tpu_vm.sh [--dry_run] stop   NAME ZONE
#   launch/tpu_vm.sh [--dry_run] delete NAME ZONE
#
# create: a queued resource of TYPE (e.g. v5litepod-16; --spot for spot
#   capacity), waiting until it is ACTIVE; an existing VM NAME is reused if
#   it is READY and of TYPE (a PREEMPTED spot VM is refused: delete it
#   first); a request an interrupted create left is waited for, not redone.
# start: refuses while a run it started is live on any worker; copies the
#   code as git sees it (tracked and untracked files, not
#   ignored ones such as runs/) into ~/sparse_gpt2 on every worker, replacing
#   everything there but runs/, installs requirements with TPU jaxlib into
#   ~/sparse_gpt2_venv (Python 3.11, made by uv: the images ship 3.10), and
#   starts the run detached on all workers, each logging to ~/sparse_gpt2.log.
#   --workdir defaults to runs/CONFIG_NAME on each host (a relative one must
#   be under runs/, which a restart keeps); give a gs:// path
#   so checkpoints outlive the VM and all hosts share one run directory
#   (gcsfs and google-cloud-storage, installed here, let etils.epath and
#   tensorboardX write there; orbax uses tensorstore).
# logs: follows one worker's log (default 0). stop: sends SIGTERM, on which
#   the run saves a checkpoint and exits, and waits for it to exit (up to
#   10 minutes). delete: removes the VM (with its queued resource, if any).
# --dry_run prints every command instead of running it. RUNTIME overrides the
# TPU software version chosen from TYPE; PROJECT sets gcloud's --project.
set -euo pipefail
usage() { sed -n '2,29p' "$0"; exit 2; }

dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
[[ $# -lt 3 ]] && usage
action=$1 name=$2 zone=$3; shift 3
positional=() spot=0 worker=0 workdir='' overrides=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --spot) spot=1 ;;
    --worker=*) worker=${1#*=} ;;
    --workdir=*) workdir=${1#*=}
      # As main refuses it: an unset $DIR in --workdir=$DIR is not the default.
      [[ -n $workdir ]] || {
        echo "error: --workdir is empty; leave it out for runs/CONFIG_NAME" >&2
        exit 2; } ;;
    --) shift; overrides=("$@"); break ;;
    -*) echo "error: unknown option $1" >&2; exit 2 ;;
    *) positional+=("$1") ;;
  esac
  shift
done

# Prints the command (shell-quoted) under --dry_run, else runs it.
run() { if (( dry_run )); then printf '%q ' "$@"; echo; else "$@"; fi; }
gcloud_tpu=(gcloud compute tpus)
[[ -n "${PROJECT:-}" ]] && gcloud_tpu+=(--project="$PROJECT")
ssh_all() { run "${gcloud_tpu[@]}" tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"; }
# On a worker: whether the pid that `start` recorded is still a run of this
# project (not a zombie, whose command line is empty, nor another program
# that a VM's restart gave the pid to).
live='pid=$(cat ~/sparse_gpt2.pid 2>/dev/null) && tr "\0" " " < /proc/$pid/cmdline 2>/dev/null | grep -q sparse_gpt2'

case $action in
  create)
    [[ ${#positional[@]} -eq 1 ]] || usage
    type=${positional[0]}
    case $type in
      v4-*) default_runtime=tpu-ubuntu2204-base ;;
      v5litepod-*) default_runtime=v2-alpha-tpuv5-lite ;;
      v5p-*) default_runtime=v2-alpha-tpuv5 ;;
      v6e-*) default_runtime=v2-alpha-tpuv6e ;;
      *) [[ -n "${RUNTIME:-}" ]] || {
           echo "error: unknown TPU type $type; set RUNTIME" >&2; exit 2; } ;;
    esac
    if (( ! dry_run )) && vm=$("${gcloud_tpu[@]}" tpu-vm describe "$name" \
        --zone="$zone" --format='value(state,acceleratorType)' 2>/dev/null)
    then
      read -r vm_state vm_type <<< "$vm"
      # Another type under this name would run the job on other chips.
      if [[ -n $vm_type && $vm_type != "$type" ]]; then
        echo "error: TPU VM $name exists as a $vm_type, not the $type asked" \
          "for: delete it ($0 delete $name $zone) or name another VM" >&2
        exit 1
      fi
      # What to do depends on the state: a create stopped by Ctrl-C leaves
      # the VM CREATING, which needs only waiting for, not deleting.
      refuse() {
        echo "error: TPU VM $name exists but is $vm_state, not READY$*" >&2
        exit 1
      }
      case $vm_state in
        READY) echo "reusing TPU VM $name"; exit 0 ;;
        CREATING|STARTING|RESTARTING|REIMAGING|REPAIRING|UNHIDING)
          refuse ": wait until it is, then run this create again to reuse it" ;;
        STOPPING|STOPPED)
          refuse ": start it once STOPPED (gcloud compute tpus tpu-vm start" \
            "$name --zone=$zone), then run this create again" ;;
        DELETING) refuse ": wait until it is gone, then create it again" ;;
        *) refuse " (a PREEMPTED spot VM stays so): delete it ($0 delete" \
             "$name $zone) and create it again" ;;
      esac
    fi
    capacity=()
    (( spot )) && capacity=(--spot)
    # A request made before (by a create stopped by Ctrl-C while it waited)
    # is waited for again: another of its name would be refused.
    if (( ! dry_run )) && qr_state=$("${gcloud_tpu[@]}" queued-resources \
        describe "$name" --zone="$zone" --format='value(state.state)' \
        2>/dev/null); then
      echo "queued resource $name was requested before ($qr_state): waiting" \
        "for it"
    else
      run "${gcloud_tpu[@]}" queued-resources create "$name" \
        --node-id="$name" --zone="$zone" --accelerator-type="$type" \
        --runtime-version="${RUNTIME:-$default_runtime}" \
        ${capacity[@]+"${capacity[@]}"}
    fi
    # The request waits in a queue until capacity frees up.
    if (( dry_run )); then
      run "${gcloud_tpu[@]}" queued-resources describe "$name" --zone="$zone" \
        --format='value(state.state)'
    else
      while state=$("${gcloud_tpu[@]}" queued-resources describe "$name" \
          --zone="$zone" --format='value(state.state)'); [[ $state != ACTIVE ]]; do
        case $state in
          FAILED|SUSPENDING|SUSPENDED)
            echo "error: queued resource $name is $state: delete it ($0" \
              "delete $name $zone) and create it again" >&2; exit 1 ;;
          DELETING)
            echo "error: queued resource $name is $state: wait until it is" \
              "gone, then create it again" >&2; exit 1 ;;
        esac
        echo "queued resource $name: $state"; sleep 60
      done
    fi
    ;;
  start)
    [[ ${#positional[@]} -eq 1 ]] || usage
    config=${positional[0]}
    repo=$(cd "$(dirname "$0")/.." && pwd)
    [[ -f "$repo/${config%%:*}" ]] || {
      echo "error: no config file ${config%%:*} in $repo" >&2; exit 2; }
    workdir=${workdir:-runs/$(basename "${config%%:*}" .py)}
    # ~/x (the local shell leaves a ~ after --workdir= alone) is the worker's
    # home, where main's --workdir reads it: absolute, not in the code copy.
    # shellcheck disable=SC2088
    if [[ $workdir != /* && $workdir != '~' && $workdir != '~/'* &&
          $workdir != *://* && $workdir != runs/* ]]; then
      echo "error: --workdir=$workdir is inside the code copy that each start" \
        "replaces; use runs/..., an absolute path or gs://..." >&2; exit 2
    fi
    # runs/../x (or /home/me/sparse_gpt2/runs/../x) is not under runs/: the
    # next start would delete it with the old code.
    if [[ $workdir != *://* && /$workdir/ == */../* ]]; then
      echo "error: --workdir=$workdir has a '..' component, which can leave" \
        "runs/; name the directory without one" >&2; exit 2
    fi
    # An absolute one, or ~/..., is checked where ~ is known: in the code
    # copy but not in its runs/, each start would delete it.
    # shellcheck disable=SC2088  # The ~ is expanded there, not here.
    case $workdir in
      /*) d=$(printf '%q' "$workdir") ;;
      '~') d='~' ;;
      '~/'*) d="~/$(printf '%q' "${workdir#'~/'}")" ;;
      *) d='' ;;
    esac
    inside=''
    [[ -n $d ]] && inside="d=$d c=\$(realpath -m ~/sparse_gpt2); case \$(realpath -m -- \"\$d\")/ in \"\$c\"/runs/*) ;; \"\$c\"/*) echo \"error: --workdir=\$d is inside ~/sparse_gpt2, the code copy that each start replaces; use ~/sparse_gpt2/runs/..., another absolute path or gs://...\" >&2; exit 2 ;; esac; "
    # Before anything changes on a worker: the code under a live run is not
    # replaced, nor a second run started into its run directory.
    ssh_all "${inside}if $live; then echo \"error: \$(hostname) is still running the run of pid \$pid: $0 stop $name $zone first\" >&2; exit 1; fi"
    tarball=${TMPDIR:-/tmp}/sparse_gpt2-$name.tar.gz
    # What git sees, so runs/, caches and build outputs never travel.
    if (( dry_run )); then
      echo "git -C $(printf '%q' "$repo") ls-files -z --cached --others --exclude-standard | tar -czf $(printf '%q' "$tarball") -C $(printf '%q' "$repo") --ignore-failed-read --null -T -"
    else
      # A tracked file deleted in the work tree is left out, not an error.
      git -C "$repo" ls-files -z --cached --others --exclude-standard \
        | tar -czf "$tarball" -C "$repo" --ignore-failed-read --null -T -
    fi
    run "${gcloud_tpu[@]}" tpu-vm scp "$tarball" "$name":sparse_gpt2.tar.gz \
      --zone="$zone" --worker=all
    # The new code each time, never a stale nested copy; runs/ (the default
    # workdirs and their checkpoints) stays, so a restart resumes.
    # The pins need Python >= 3.11 and the TPU images ship 3.10: uv makes a
    # virtual environment on a Python of its own (once; a restart reuses it).
    ssh_all "mkdir -p ~/sparse_gpt2 && find ~/sparse_gpt2 -mindepth 1 -maxdepth 1 ! -name runs -exec rm -rf {} + && tar -xzf ~/sparse_gpt2.tar.gz -C ~/sparse_gpt2 && python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --allow-existing --python 3.11 ~/sparse_gpt2_venv && ~/.local/bin/uv pip install -q --python ~/sparse_gpt2_venv/bin/python -r ~/sparse_gpt2/requirements.txt 'jax[tpu]==0.10.2' gcsfs google-cloud-storage"
    # (An empty array under `set -u` is an error in bash before 4.4, macOS's.)
    args=(--config="$config" --workdir="$workdir" ${overrides[@]+"${overrides[@]}"})
    # Only python goes to the background, so the pid `stop` signals is its
    # (backgrounding the whole `cd && ...` list recorded a subshell's, and
    # SIGTERM killed the shell, never the run).
    ssh_all "cd ~/sparse_gpt2 && { SPARSE_GPT2_DISTRIBUTED=1 nohup ~/sparse_gpt2_venv/bin/python -m sparse_gpt2.main $(printf '%q ' "${args[@]}")> ~/sparse_gpt2.log 2>&1 < /dev/null & echo \$! > ~/sparse_gpt2.pid; }"
    ;;
  logs)
    run "${gcloud_tpu[@]}" tpu-vm ssh "$name" --zone="$zone" --worker="$worker" \
      --command="tail -n 100 -F ~/sparse_gpt2.log"
    ;;
  stop)
    # The run saves a checkpoint on SIGTERM: a `start` right after this one
    # must find it gone, not saving into the run directory it reuses.
    ssh_all "if $live; then kill -TERM \$pid; for i in \$(seq 300); do $live || break; sleep 2; done; if $live; then echo \"error: \$(hostname): the run of pid \$pid is still saving after 10 minutes\" >&2; exit 1; fi; fi; rm -f ~/sparse_gpt2.pid"
    ;;
  delete)
    # A VM that create's request made goes with the request (--force). One
    # that create reused, made by `gcloud compute tpus tpu-vm create`, has
    # none: deleting a request alone failed (NOT_FOUND) and left it running.
    if (( ! dry_run )) && ! "${gcloud_tpu[@]}" queued-resources describe \
        "$name" --zone="$zone" --format='value(state.state)' \
        > /dev/null 2>&1; then
      run "${gcloud_tpu[@]}" tpu-vm delete "$name" --zone="$zone" --quiet
    else
      run "${gcloud_tpu[@]}" queued-resources delete "$name" --zone="$zone" \
        --force --quiet
    fi
    ;;
  *) usage ;;
esac
