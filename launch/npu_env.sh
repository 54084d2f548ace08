#!/usr/bin/env bash
# Ascend NPU environment for mergevq: `source launch/npu_env.sh` before accelerate launch / multinode.sh.
#
# Install (on the Ascend host only; never in CI or on a machine without CANN, where installing torch-npu
# breaks `import torch` itself):
#   pip install -c constraints.txt '.[npu]'       # torch-npu pinned to the torch release (pyproject extra)
#   # the CANN toolkit (driver, firmware, toolkit, kernels) comes from the machine's vendor image.
#
# Run (backend=npu imports torch_npu lazily; conf/backend/npu.yaml: bf16, HCCL):
#   source launch/npu_env.sh
#   accelerate launch --config_file launch/accelerate/npu.yaml -m mergevq.entries.train_tokenizer backend=npu ...
#   launch/multinode.sh --backend npu --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 ...
#
# Variables (override any of them before sourcing):
#   ASCEND_HOME / ASCEND_TOOLKIT_HOME  where CANN is installed; its set_env.sh sets LD_LIBRARY_PATH etc.
#   ASCEND_RT_VISIBLE_DEVICES          the NPUs this node uses (the NPU's CUDA_VISIBLE_DEVICES), e.g. 0,1,2,3
#   HCCL_CONNECT_TIMEOUT               seconds to wait for all ranks at initialization (large jobs: 1200+)
#   HCCL_EXEC_TIMEOUT                  seconds a collective may take before it is reported stuck
#   HCCL_IF_IP / HCCL_SOCKET_IFNAME    host NIC (address / interface) for HCCL's out-of-band rendezvous
#   HCCL_BUFFSIZE                      MB of buffer per communicator (default 200)
#   HCCL_WHITELIST_DISABLE=1           skip the trust-list check between hosts
#   TORCH_DEVICE_BACKEND_AUTOLOAD=0    what to set on a host WITHOUT CANN that has torch-npu installed by
#                                      mistake: torch then imports, and backend=npu fails with a clear error

ASCEND_HOME="${ASCEND_HOME:-${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}}"
if [[ -f "$ASCEND_HOME/set_env.sh" ]]; then
    # shellcheck disable=SC1091
    source "$ASCEND_HOME/set_env.sh"
elif [[ -f "$ASCEND_HOME/latest/set_env.sh" ]]; then
    # shellcheck disable=SC1091
    source "$ASCEND_HOME/latest/set_env.sh"
else
    echo "npu_env: no CANN set_env.sh under $ASCEND_HOME (set ASCEND_HOME); torch-npu will not load" >&2
fi

export ASCEND_RT_VISIBLE_DEVICES="${ASCEND_RT_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}"
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"
export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1800}"
export HCCL_WHITELIST_DISABLE="${HCCL_WHITELIST_DISABLE:-1}"
# export HCCL_IF_IP=10.0.0.1              # this host's address on the network the nodes share
# export HCCL_SOCKET_IFNAME=eth0
# Processes per node for launch/multinode.sh --backend npu (one per visible NPU).
NPROC_PER_NODE="$(awk -F, '{print NF}' <<<"$ASCEND_RT_VISIBLE_DEVICES")"
export NPROC_PER_NODE
echo "npu_env: ASCEND_RT_VISIBLE_DEVICES=$ASCEND_RT_VISIBLE_DEVICES (NPROC_PER_NODE=$NPROC_PER_NODE)," \
     "HCCL_CONNECT_TIMEOUT=$HCCL_CONNECT_TIMEOUT" >&2
