#!/usr/bin/env bash
#SBATCH --job-name=lm-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --output=slurm-%j.out
#
# Train on several nodes under Slurm: one scripts/launch.sh per node (started by srun), each
# running NPROC_PER_NODE processes under torchrun, all joined by torchrun's c10d rendezvous.
#
#   sbatch scripts/slurm.sh clm|mlm|plm [flags for run_TASK.py...]     # from the project root
#   sbatch --nodes 4 --gpus-per-node 4 scripts/slurm.sh mlm --num_train_epochs 1
#
# The #SBATCH lines above are defaults; sbatch's own flags override them. Slurm runs a copy
# of this file, so submit from the project root (or set LM_ROOT to it). --output_dir must be
# on a file system all nodes share: global rank 0 writes the checkpoints and results there.
#
# Derived from Slurm (scripts/slurm_env.sh): NNODES (SLURM_NNODES), NODE_RANK (SLURM_NODEID,
# per node), MASTER_ADDR (the first host of SLURM_JOB_NODELIST), MASTER_PORT (from the job id
# into 29500..39499, slurm_job_port) and the rendezvous (c10d at MASTER_ADDR:MASTER_PORT, id SLURM_JOB_ID).
# NPROC_PER_NODE defaults to SLURM_GPUS_ON_NODE, else 8. DEVICE, AMP_FLAGS, OUTPUT_DIR, MODEL
# and the rest are scripts/launch.sh's (sbatch passes the environment on).
#
# Time limit: Slurm sends this script SIGTERM 300 s before it (--signal=B:TERM@300). It is
# passed on once to every process of the job step (scancel --signal=TERM); the training
# processes finish their step, save a checkpoint and exit 143 (torchrun, the launchers and
# tee ignore it, so that no process gets it twice: a second SIGTERM stops without saving).
# scancel --signal=INT JOB (or Ctrl+C on srun) does the same with exit status 130. A SIGTERM
# that comes before training has started is ignored (there is nothing to save yet).
# Submit the same command again to resume from that checkpoint.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n ${LM_ROOT:-} ]]; then
    ROOT=$LM_ROOT
elif [[ -f $here/scripts/launch.sh ]]; then
    ROOT=$here
else  # sbatch runs a copy from its spool folder
    ROOT=${SLURM_SUBMIT_DIR:-$PWD}
fi
if [[ ! -f $ROOT/scripts/launch.sh ]]; then
    echo "error: $ROOT/scripts/launch.sh not found: submit from the project root or set LM_ROOT" >&2
    exit 2
fi
# shellcheck source=scripts/slurm_env.sh
. "$ROOT/scripts/slurm_env.sh"

if [[ ${1-} == --node ]]; then
    # One node's task, under srun. Slurm signals every process of the step at once: only the
    # training processes may act on SIGTERM and SIGINT (they install their own handlers). An
    # ignored signal stays ignored in the children (launch.sh, tee, torchrun), and torchrun is
    # told not to handle these two, or it would pass on a second one.
    shift
    slurm_node_env
    trap '' TERM INT
    export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT
    exec bash "$ROOT/scripts/launch.sh" "$@"
fi

slurm_job_env
export NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
echo "slurm: job ${SLURM_JOB_ID:-?}, $NNODES node(s) x $NPROC_PER_NODE processes, rendezvous $PET_RDZV_ENDPOINT"

srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$ROOT/scripts/slurm.sh" --node "$@" &
step=$!
stop_step() {
    echo "slurm: SIGTERM before the time limit: the training processes save a checkpoint and stop" >&2
    if command -v scancel >/dev/null 2>&1; then
        scancel --signal=TERM "${SLURM_JOB_ID}"  # every job step, not this batch script
    else
        kill -TERM "$step"  # srun passes it on to the step
    fi
}
trap stop_step TERM
status=0
while true; do
    wait "$step" && status=0 || status=$?
    kill -0 "$step" 2>/dev/null || break  # wait returned for the trap, not because srun ended
done
exit "$status"
