#!/usr/bin/env bash
#SBATCH --job-name=lm-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
#
# Train on several nodes under Slurm: one scripts/launch.sh per node (started by srun), each
# running NPROC_PER_NODE processes under torchrun, all joined by torchrun's c10d rendezvous.
#
#   sbatch scripts/slurm.sh clm|mlm|plm [flags for run_TASK.py...]     # from the project root
#   sbatch --nodes 4 --gpus-per-node 4 scripts/slurm.sh mlm --num_train_epochs 1
#   NPROC_PER_NODE=2 DEVICE=cpu AMP_FLAGS="" sbatch --nodes 1 --gpus-per-node 0 --time 2:00:00 scripts/slurm.sh clm
#
# The #SBATCH lines above are defaults for GPU nodes; sbatch's own flags override them. On a
# partition without GPUs pass --gpus-per-node 0 (else sbatch refuses the job: "Invalid generic
# resource"), and where the partition's MaxTime is below 24 h a --time within it (else the job
# pends with reason PartitionTimeLimit). Slurm runs a copy of this file, so submit from the
# project root (or set LM_ROOT to it). --output_dir must be on a file system all nodes share:
# global rank 0 writes the checkpoints and results there.
#
# Derived from Slurm (scripts/slurm_env.sh): NNODES (SLURM_NNODES), NODE_RANK (SLURM_NODEID,
# per node), MASTER_ADDR (the first host of SLURM_JOB_NODELIST), MASTER_PORT (from the job id
# into 29500..39499, slurm_job_port) and the rendezvous (c10d at MASTER_ADDR:MASTER_PORT, id SLURM_JOB_ID).
# NPROC_PER_NODE defaults to SLURM_GPUS_ON_NODE, else 8. DEVICE, AMP_FLAGS, OUTPUT_DIR, MODEL
# and the rest are scripts/launch.sh's (sbatch passes the environment on).
#
# Time limit: Slurm sends this script SIGTERM 300 s before it (--signal=B:TERM@300; B:USR1 works
# the same, and so does `scancel --signal=TERM --batch JOB`). It is passed on once to every
# process of the job step (scancel --signal=TERM); the training processes finish the same step,
# save a checkpoint and exit 143. Then the job requeues itself (scontrol requeue): Slurm starts it
# again (after its requeue delay, about 2 minutes) and it resumes from that checkpoint, its output
# appended to the same slurm-JOB.out. sbatch --no-requeue turns that off: submit the same command
# again to resume. A plain `scancel JOB` is the user's stop: the training processes save and
# stop the same way within Slurm's KillWait, and the job ends CANCELLED, never requeued. Repeated
# signals (Slurm signals every process of a step, srun and torchrun pass theirs on) are one stop:
# the training processes act on the first and their DataLoader workers ignore them. A SIGTERM
# that comes before training has started is ignored (there is nothing to save yet).
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
    # told not to handle these two (its --signals-to-handle, read from PET_*), or it would pass on a
    # second one.
    shift
    slurm_node_env
    trap '' TERM INT
    export PET_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT
    exec bash "$ROOT/scripts/launch.sh" "$@"
fi

slurm_job_env
export NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
say() { echo "slurm: $*"; }
# FIELD's value in `scontrol show job` for this job (JobState, Requeue, ...); empty if scontrol fails.
job_field() { scontrol show job --oneliner "$SLURM_JOB_ID" 2>/dev/null | sed -nE "s/^(.* )?$1=([^ ]*).*/\2/p" || true; }

say "job $SLURM_JOB_ID, $NNODES node(s) x $NPROC_PER_NODE processes, rendezvous $PET_RDZV_ENDPOINT"
if ((${SLURM_RESTART_COUNT:-0} > 0)); then
    say "start $((SLURM_RESTART_COUNT + 1)) of this job (requeued): it resumes from the newest complete checkpoint"
fi

srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$ROOT/scripts/slurm.sh" --node "$@" &
step=$!
stopping=""
stop_step() {  # $1: the signal
    local state
    state=$(job_field JobState)
    if [[ -n $state && $state != RUNNING ]]; then
        # scancel JOB (or the time limit itself) signals every process at once: nothing to pass on.
        say "$1 while the job is $state (scancel, or the time limit): the training processes save a checkpoint" \
            "and stop; the job is not requeued: submit the same command again to resume"
        stopping=cancelled
        return
    fi
    [[ -z $stopping ]] || return 0  # the same stop, signalled again
    stopping=requeue
    say "$1 received (the time limit is near, or scancel --batch): every training process saves a checkpoint" \
        "at the same step and stops, then the job requeues itself"
    # Every process of every job step, not this script. Not srun: on a SIGTERM it SIGKILLs the step.
    scancel --signal=TERM "$SLURM_JOB_ID"
}
trap 'stop_step SIGTERM' TERM
trap 'stop_step SIGUSR1' USR1
status=0
while true; do
    wait "$step" && status=0 || status=$?
    kill -0 "$step" 2>/dev/null || break  # wait returned for the trap, not because srun ended
done

if [[ $stopping == requeue ]]; then
    trap '' TERM USR1  # the requeue ends this script with a SIGTERM: finish the log first
    if ((status != 143)); then
        say "the training did not stop with its work saved (exit $status): the job is not requeued; see the log above"
    elif [[ $(job_field Requeue) == 0 ]]; then
        say "the training stopped with its work saved; not requeued (--no-requeue): submit the same command again to resume"
    else
        say "the training stopped with its work saved; requeueing job $SLURM_JOB_ID: once Slurm starts it again" \
            "(after its requeue delay; squeue -j $SLURM_JOB_ID shows when) it resumes from that checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
fi
exit "$status"
