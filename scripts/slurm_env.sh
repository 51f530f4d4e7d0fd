#!/usr/bin/env bash
# Derive torchrun's multi-node settings from Slurm's variables. Sourced by scripts/slurm.sh.
#
#   slurm_job_env    in the batch script: exports NNODES, MASTER_ADDR, MASTER_PORT and
#                    torchrun's c10d rendezvous (PET_RDZV_BACKEND, PET_RDZV_ENDPOINT, PET_RDZV_ID)
#   slurm_node_env   in each node's task: exports NODE_RANK (and NNODES)
#   slurm_first_host NODELIST   the first host of a Slurm node list, without scontrol
#   slurm_job_port JOB_ID       the job's MASTER_PORT when none is set
#
# From Slurm: SLURM_NNODES (or SLURM_JOB_NUM_NODES), SLURM_NODEID, SLURM_JOB_NODELIST,
# SLURM_JOB_ID. MASTER_ADDR is the first host of the node list (`scontrol show hostnames`
# when scontrol is on PATH, else slurm_first_host); MASTER_ADDR and MASTER_PORT already set
# win. torchrun reads PET_* as its --rdzv_* flags, so scripts/launch.sh needs no change.

# "node[01-04,07]" -> node01; "gpu-a7,gpu-b[1-2]" -> gpu-a7; "n[3-4]-ib" -> n3-ib; "r[1-2]n[5-6]" -> r1n5
slurm_first_host() {
    local list=$1 first
    # The first entry: up to the first comma that is outside brackets.
    first=$(printf '%s' "$list" | sed -E 's/^(([^,[]|\[[^]]*\])*).*/\1/')
    # Each bracket group becomes its first number, zero padding kept: "[01-04,07]" -> 01.
    while [[ $first =~ ^([^[]*)\[([^]]*)\](.*)$ ]]; do
        local range=${BASH_REMATCH[2]}
        range=${range%%,*}
        first="${BASH_REMATCH[1]}${range%%-*}${BASH_REMATCH[3]}"
    done
    printf '%s\n' "$first"
}

# One rendezvous port per job in 29500..39499, so that jobs sharing a node do not collide. The job
# number mod 10000 plus its count of ten-thousands: jobs less than 9999 apart, and jobs 10000 (or
# any multiple of it below 10^8) apart, get different ports. A job id that is not a number
# (an array task's "123_4", a heterogeneous "123+1") is reduced to one by its checksum.
slurm_job_port() {
    local id=$1 number
    if [[ $id =~ ^[0-9]+$ ]]; then
        (( ${#id} <= 15 )) || id=${id: -15}  # within 64-bit arithmetic
        number=$((10#$id))  # base 10: no octal for leading zeros
    else
        number=$(printf '%s' "$id" | cksum | cut -d ' ' -f 1)
    fi
    echo $((29500 + (number + number / 10000) % 10000))
}

_slurm_die() {
    echo "error: $*" >&2
    exit 2
}

slurm_job_env() {
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
    NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}}
    [[ -n $NNODES ]] || _slurm_die "SLURM_NNODES is not set: start scripts/slurm.sh with sbatch"
    [[ -n $nodelist ]] || _slurm_die "SLURM_JOB_NODELIST is not set: start scripts/slurm.sh with sbatch"
    if [[ -z ${MASTER_ADDR:-} ]]; then
        if command -v scontrol >/dev/null 2>&1; then
            MASTER_ADDR=$(scontrol show hostnames "$nodelist" | head -n 1)
        fi
        MASTER_ADDR=${MASTER_ADDR:-$(slurm_first_host "$nodelist")}
    fi
    MASTER_PORT=${MASTER_PORT:-$(slurm_job_port "${SLURM_JOB_ID:-0}")}
    export NNODES MASTER_ADDR MASTER_PORT
    export PET_RDZV_BACKEND=c10d PET_RDZV_ENDPOINT="$MASTER_ADDR:$MASTER_PORT" PET_RDZV_ID="${SLURM_JOB_ID:-lm}"
}

slurm_node_env() {
    NODE_RANK=${SLURM_NODEID:-}
    [[ -n $NODE_RANK ]] || _slurm_die "SLURM_NODEID is not set: scripts/slurm.sh runs this part under srun"
    NNODES=${NNODES:-${SLURM_NNODES:-1}}
    export NODE_RANK NNODES
}
