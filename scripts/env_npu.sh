# Environment for training on Ascend NPUs. Source it, do not run it:
#
#     source scripts/env_npu.sh
#
# scripts/launch.sh sources it when DEVICE=npu. It loads CANN's own set_env.sh (library and
# Python paths torch_npu needs) and sets the Ascend/HCCL variables below; every variable keeps
# a value you exported before sourcing. On a machine without CANN it prints a note and only
# sets the variables, so it is safe to source anywhere.
#
# ASCEND_BASE   where CANN is installed (default /usr/local/Ascend)

ASCEND_BASE="${ASCEND_BASE:-/usr/local/Ascend}"

if [ -f "$ASCEND_BASE/ascend-toolkit/set_env.sh" ]; then
    # shellcheck disable=SC1091
    . "$ASCEND_BASE/ascend-toolkit/set_env.sh"
else
    echo "note: $ASCEND_BASE/ascend-toolkit/set_env.sh not found; NPU runs need CANN (set ASCEND_BASE to its prefix)" >&2
fi

# Ascend Transformer Boost kernels ship in the optional NNAL package; load them when present.
if [ -f "$ASCEND_BASE/nnal/atb/set_env.sh" ]; then
    # shellcheck disable=SC1091
    . "$ASCEND_BASE/nnal/atb/set_env.sh"
fi

# Dispatch operators through a separate queue so the host prepares the next kernels while the
# device runs the current ones (2 adds a deeper level on recent CANN; 0 is for debugging).
export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE:-1}"

# Merge the copies torch_npu makes of non-contiguous tensors (transposes, slices) into one kernel.
export COMBINED_ENABLE="${COMBINED_ENABLE:-1}"

# Seconds the ranks wait for each other while building the HCCL communicator. HCCL's 120 s default
# is too short when 8 ranks finish loading data and compiling operators at different times.
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"

# Seconds a collective waits for a slow rank before HCCL aborts the job; matches the 1800 s
# torch.distributed timeout transformers uses (--ddp_timeout).
export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1800}"

# A single node needs no allow-list of peer host addresses.
export HCCL_WHITELIST_DISABLE="${HCCL_WHITELIST_DISABLE:-1}"

# CANN log level: 0 debug, 1 info, 2 warning, 3 error. Errors only keeps ~/ascend/log small.
export ASCEND_GLOBAL_LOG_LEVEL="${ASCEND_GLOBAL_LOG_LEVEL:-3}"

# Keep CANN's logs in ~/ascend/log rather than interleaved with train.log.
export ASCEND_SLOG_PRINT_TO_STDOUT="${ASCEND_SLOG_PRINT_TO_STDOUT:-0}"

# No event logging: it only matters when profiling CANN itself.
export ASCEND_GLOBAL_EVENT_ENABLE="${ASCEND_GLOBAL_EVENT_ENABLE:-0}"

# Read by utils/launch/device.py. 0 = use prebuilt operator kernels rather than compiling online, so
# each new tensor shape does not trigger a compile.
export NPU_JIT_COMPILE="${NPU_JIT_COMPILE:-0}"

# Read by utils/launch/device.py. 0 = keep tensors in standard layouts; private layouts (FRACTAL_NZ)
# add casts around transformer matmuls and are a frequent source of shape/accuracy surprises.
export NPU_INTERNAL_FORMAT="${NPU_INTERNAL_FORMAT:-0}"
