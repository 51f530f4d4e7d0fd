#!/usr/bin/env bash
# Start run_TASK.py under torchrun with the reference-run defaults.
#
#   scripts/launch.sh clm|mlm|plm [flags for run_TASK.py...]
#
# Usually called through scripts/train_{clm,mlm,plm}_{1p,8p}.sh. The defaults reproduce the
# reference runs (gpt2 / roberta-base / xlnet-base-cased on WikiText-2 raw, batch 8 per device,
# fp16 O2 with combined gradients, 3 epochs). Your flags come after them and the last
# occurrence of a flag wins, so `--num_train_epochs 1` or `--output_dir x` simply override.
#
# Train from scratch: pass --model_type (with --config_overrides, --tokenizer_name), or set
# MODEL="" -- either drops the default --model_name_or_path. Passing --train_file or
# --dataset_name, or DATASET="", drops the default WikiText dataset flags.
#
# Environment (all optional):
#   NPROC_PER_NODE   processes, one per device, on this node (the wrappers default to 1 or 8);
#                    more than the visible CUDA/NPU devices stops with an error, CPU takes any
#   NNODES NODE_RANK MASTER_ADDR MASTER_PORT   torchrun multi-node settings (1 0 127.0.0.1, and a free
#                    port on one node, 29500 on several; a port taken on node 0 stops with an error)
#   PET_NNODES PET_NPROC_PER_NODE PET_NODE_RANK PET_MASTER_ADDR PET_MASTER_PORT   what Kubernetes
#                    (Kubeflow Trainer's TrainJob, PyTorchJob) sets in each pod: they override the
#                    five above. A PyTorchJob that sets no PET_* gives MASTER_ADDR, MASTER_PORT,
#                    WORLD_SIZE (its pods) and RANK (this pod): they become NNODES and NODE_RANK
#   MAX_RESTARTS     restart the processes up to N times when one crashes or is killed (default 0);
#                    they resume from the newest complete checkpoint. Uses torchrun's c10d
#                    rendezvous at MASTER_ADDR:MASTER_PORT, which allows restarts (RDZV_ID names the job)
#   DEVICE           npu | cuda | cpu; unset takes the first usable of NPU, CUDA, CPU.
#                    npu sources scripts/env_npu.sh. Passed on to Python as LM_DEVICE.
#   MODEL            --model_name_or_path (default per task)
#   DATASET DATASET_CONFIG   --dataset_name / --dataset_config_name (wikitext, wikitext-2-raw-v1)
#   AMP_FLAGS        "--fp16 --fp16_opt_level O2 --use_combine_grad"; AMP_FLAGS="" trains in fp32
#   OUTPUT_DIR       default outputs/TASK_Np, relative to the current directory
#   PYTHON           interpreter (python)
#
# Output: OUTPUT_DIR/train.log holds everything the run printed (train_node<N>.log on other
# nodes) and ends with one summary row (format: utils/report/results.py), found with
#   grep '^| ' OUTPUT_DIR/train.log | tail -1
#   | gpt2 | 8p | Acc: 0.4213 | FPS: 123.4 | AMP_Type: O2 | Epochs: 3 |
# Bad settings (DEVICE, NPROC_PER_NODE above the visible devices, ...) stop it before torchrun
# starts, with one "error: ..." line and exit status 2. A run that fails or stops ends with one
# "error: run_TASK.py failed (exit N): REASON" line and the worker's own status N (2 bad input,
# 3 non-finite loss). A stop ends with "stopped: ..." and 143 (SIGTERM) or 130 (SIGINT): the work
# is saved, run the same command again to resume.
#
# Ctrl+C, `timeout`, systemd and Slurm signal the whole process group. This script and its `tee`
# outlive that signal: torchrun passes it on to the workers once, every rank checkpoints, and the
# log keeps every line up to the last (utils/launch/torchrun.py). Ctrl+C again stops at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

die() {
    echo "error: $*" >&2
    exit 2
}

TASK="${1-}"
case $TASK in
    clm) default_model=gpt2 ;;
    mlm) default_model=roberta-base ;;
    plm) default_model=xlnet-base-cased ;;
    *) die "TASK must be clm, mlm or plm: scripts/launch.sh clm|mlm|plm [flags...]" ;;
esac
shift

[[ -z ${WORLD_SIZE-} || $WORLD_SIZE =~ ^[1-9][0-9]*$ ]] ||
    die "WORLD_SIZE=$WORLD_SIZE: give a positive whole number, or unset it (torchrun sets it for the processes)"
# Kubernetes sets a pod's part of the job (see the header): torchrun's PET_* variables win, then a
# PyTorchJob's WORLD_SIZE and RANK (pods, this pod) where it sets no PET_* (and not under torchrun).
if [[ -z ${PET_NNODES-} && -n ${MASTER_ADDR-} && -n ${WORLD_SIZE-} && -n ${RANK-} && -z ${LOCAL_RANK-} ]]; then
    NNODES=$WORLD_SIZE NODE_RANK=$RANK
fi
NPROC_PER_NODE="${PET_NPROC_PER_NODE:-${NPROC_PER_NODE:-1}}"
NNODES="${PET_NNODES:-${NNODES:-1}}"
NODE_RANK="${PET_NODE_RANK:-${NODE_RANK:-0}}"
MASTER_ADDR="${PET_MASTER_ADDR:-${MASTER_ADDR:-}}"
MASTER_PORT="${PET_MASTER_PORT:-${MASTER_PORT:-}}"
[[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
    die "${PET_NPROC_PER_NODE:+PET_}NPROC_PER_NODE=$NPROC_PER_NODE: give a positive whole number"
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "${PET_NNODES:+PET_}NNODES=$NNODES: give a positive whole number"
[[ $NODE_RANK =~ ^[0-9]+$ ]] && ((NODE_RANK < NNODES)) ||
    die "${PET_NODE_RANK:+PET_}NODE_RANK=$NODE_RANK: give this node's number, from 0 to NNODES-1 ($((NNODES - 1)))"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS: give a whole number of restarts (0: none)"
devices="$((NPROC_PER_NODE * NNODES))p"

DEVICE="${DEVICE:-${LM_DEVICE:-}}"
case $DEVICE in
    npu | cuda | cpu | "") ;;
    *) die "DEVICE=$DEVICE: use npu, cuda or cpu, or leave it unset" ;;
esac
if [[ $DEVICE == npu ]]; then
    set +u  # CANN's set_env.sh reads variables that may be unset
    # shellcheck source=scripts/env_npu.sh
    . "$ROOT/scripts/env_npu.sh"
    set -u
fi
export LM_DEVICE="$DEVICE"

# Fail before torchrun starts N processes: the device must load and have enough units.
device=$("$PYTHON" -m utils.launch.device --nproc "$NPROC_PER_NODE") || exit 2
if [[ $device == cpu ]]; then
    # Makes transformers build a gloo process group even if --use_cpu is not passed.
    export ACCELERATE_USE_CPU=true
fi

# Which defaults your flags already choose, read by the scripts' own parser (utils/flags/launch_flags.py):
# a model, data, an output folder; and your flags as the log shows them, hub tokens masked.
chosen=$("$PYTHON" -m utils.flags.launch_flags "$TASK" "$@") || exit 2
mapfile -t chosen <<<"$chosen"
model_chosen=${chosen[0]} data_chosen=${chosen[1]} output_dir=${chosen[2]-} masked_flags=${chosen[3]-}
output_dir="${output_dir:-${OUTPUT_DIR:-outputs/${TASK}_${devices}}}"

defaults=()
model="${MODEL-$default_model}"
if [[ -n $model && $model_chosen == 0 ]]; then
    defaults+=(--model_name_or_path "$model")
fi
dataset="${DATASET-wikitext}"
if [[ -n $dataset && $data_chosen == 0 ]]; then
    defaults+=(--dataset_name "$dataset" --dataset_config_name "${DATASET_CONFIG:-wikitext-2-raw-v1}")
fi
default_amp="--fp16 --fp16_opt_level O2 --use_combine_grad"
read -r -a amp_flags <<<"${AMP_FLAGS-$default_amp}"
defaults+=(
    --per_device_train_batch_size 8
    --per_device_eval_batch_size 8
    --do_train
    --do_eval
    "${amp_flags[@]}"
    --num_train_epochs 3
    --save_steps 100000
    --output_dir "$output_dir"
)
flags=("${defaults[@]}" "$@")

[[ -f $ROOT/run_${TASK}.py ]] || die "$ROOT/run_${TASK}.py not found"

# The rendezvous port. One node: a free one unless MASTER_PORT is given, so that two runs on one
# machine do not collide. Node 0 hosts it: a port already taken there stops the launch here.
master_port="${MASTER_PORT:-}"
if [[ -z $master_port && $NNODES == 1 ]]; then
    master_port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
fi
master_port="${master_port:-29500}"
[[ $master_port =~ ^[1-9][0-9]*$ ]] && ((master_port < 65536)) || die "MASTER_PORT=$master_port: give a port number from 1 to 65535"
if [[ $NODE_RANK == 0 ]] && ! "$PYTHON" -c '
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store binds it
s.bind(("", int(sys.argv[1])))' "$master_port" 2>/dev/null; then
    die "MASTER_PORT=$master_port is already in use on this machine (another run?); choose a free port${MASTER_PORT:+, or leave MASTER_PORT unset on a single node to get one}"
fi

cmd=(
    "$PYTHON" -m utils.launch.torchrun  # torchrun, passing on the worker's exit status (utils/launch/torchrun.py)
    --nproc_per_node="$NPROC_PER_NODE"
    --nnodes="$NNODES"
    --node_rank="$NODE_RANK"
    --master_addr="${MASTER_ADDR:-127.0.0.1}"
    --master_port="$master_port"
    "$ROOT/run_${TASK}.py" "${flags[@]}"
)
if ((MAX_RESTARTS > 0)); then
    # The default (static) rendezvous cannot start a group twice; c10d's can. Each attempt's
    # processes get a store of their own, so that none reads an address left by a killed one.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    cmd=("${cmd[@]:0:3}" --max-restarts="$MAX_RESTARTS" --rdzv-backend=c10d
         --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:$master_port" --rdzv-id="${RDZV_ID:-lm-$TASK}"
         "${cmd[@]:3}")
fi

# The log lives in the output folder from the start; a resumed run appends to it. The run
# itself ignores this file when it checks that --output_dir holds nothing it could overwrite.
node_suffix=""
[[ $NODE_RANK == 0 ]] || node_suffix="_node${NODE_RANK}"
[[ ! -e $output_dir || -d $output_dir ]] || die "--output_dir $output_dir is a file, not a folder; choose another --output_dir"
mkdir -p "$output_dir" 2>/dev/null || die "--output_dir $output_dir cannot be created (a part of its path is a file, or not writable); choose another --output_dir"
log="$output_dir/train${node_suffix}.log"

status=0
log_start=$(($(stat -c %s "$log" 2>/dev/null || echo 0) + 1))  # where this run's part of the log begins
# The command as run, your flags (the last $# of it) as launch_flags masked them.
printf 'device: %s, %s\ncommand: %s%s\n' "$device" "$devices" "$(printf '%q ' "${cmd[@]:0:${#cmd[@]}-$#}")" \
    "$masked_flags" | tee -a "$log"
# A SIGINT/SIGTERM to the process group: torchrun hands it to the workers and waits for their
# checkpoint; this script waits for torchrun, and tee ignores it so that no line is lost.
if (($$ == 1)); then
    # A container's first process: Kubernetes and docker stop signal it alone, which reaches no worker.
    echo "warning: the launcher is the container's first process (PID 1): its SIGTERM does not reach the" \
        "training processes; start it under an init that signals the whole group (tini -g, dumb-init)" >&2
fi
trap : INT TERM  # not ignored: the processes started here get the default handling back
"${cmd[@]}" 2>&1 | (trap '' INT TERM && exec tee -a "$log") || status=$?
trap - INT TERM
if ((status != 0)); then
    # Name the run's own one-line reason (error: ... / stopped: ...), not only its status.
    line=$(tail -c +"$log_start" "$log" | grep -m1 -E '^(error|stopped): ' || true)
    reason=$(sed -E 's/^(error|stopped): //' <<<"$line")
    if [[ $line == stopped:* ]] && ((status == 130 || status == 143)); then
        echo "stopped: run_${TASK}.py (exit $status): $reason; see $log" >&2
    else
        echo "error: run_${TASK}.py failed (exit $status)${reason:+: $reason}; see $log" >&2
    fi
    exit "$status"
fi

# Results are written by global rank 0, which runs on node 0.
[[ $NODE_RANK == 0 ]] || exit 0
"$PYTHON" -m utils.report.summary "$output_dir" 2>&1 | tee -a "$log"
