#!/usr/bin/env bash
# Multi-node launcher: one call per node starts `accelerate launch` with the rendezvous flags, taken from
# arguments or, inside a SLURM allocation, from the SLURM variables. Nothing in this file is edited per job.
#
#   launch/multinode.sh [options] [ENTRY] [--] [HYDRA OVERRIDES ...]
#
# ENTRY is a mergevq entry (module mergevq.entries.ENTRY): train_tokenizer (default), train_ar, evaluate,
# pretokenize (or its config name tokenize), sample, probe.
# Run `launch/multinode.sh --help` for the options. Examples:
#   # by hand, on each of 2 nodes with 8 GPUs (node rank 0 on host node0):
#   launch/multinode.sh --nnodes 2 --node-rank 0 --master-addr node0 --nproc-per-node 8 \
#       train_tokenizer experiment=tokenizer_256_gr_d64 data.root=/data/imagenet
#   # in an sbatch script (one task per node; see launch/slurm_tokenizer.sbatch):
#   srun --ntasks-per-node=1 launch/multinode.sh train_tokenizer experiment=tokenizer_256_gr_d64 ...
#   # print the command instead of running it:
#   launch/multinode.sh --dry-run --nnodes 2 --node-rank 1 --master-addr node0 --nproc-per-node 8
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    cat <<'EOF'
usage: launch/multinode.sh [options] [ENTRY] [--] [HYDRA OVERRIDES ...]

Starts, on this node, `accelerate launch ... -m mergevq.entries.ENTRY backend=<backend> OVERRIDES`.
Every value comes from an option, else from the environment (SLURM or torch-style), else a default:

  --nnodes N            nodes in the job          [SLURM_NNODES, NNODES; default 1]
  --node-rank R         rank of this node, 0..N-1 [SLURM_NODEID, NODE_RANK; default 0]
  --master-addr HOST    address of node rank 0    [MASTER_ADDR, first host of
                                                   `scontrol show hostnames $SLURM_JOB_NODELIST`,
                                                   SLURM_LAUNCH_NODE_IPADDR; default 127.0.0.1 when N = 1]
  --master-port PORT    rendezvous port           [MASTER_PORT; default 29500; 0 on one node: any free port]
  --nproc-per-node G    processes (devices) per node
                                                  [SLURM_GPUS_ON_NODE, NPROC_PER_NODE,
                                                   else the visible GPUs counted by nvidia-smi]
  --backend NAME        Hydra backend option passed as backend=NAME: multinode (CUDA, default) | npu
                        (cpu with --config launch/accelerate/cpu_2proc.yaml and ACCELERATE_USE_CPU=1
                        runs the same path on one CPU machine: a smoke test)
  --config FILE         accelerate config file    [default: launch/accelerate/multinode.yaml,
                                                   launch/accelerate/npu.yaml for --backend npu]
  --run-dir DIR         run directory shared by every rank and kept across requeues
                        [MERGEVQ_RUN_DIR; inside SLURM: outputs/ENTRY/slurm_<SLURM_JOB_ID>]
  --accelerate BIN      the accelerate executable [ACCELERATE; default: accelerate]
  --dry-run             print the command (one line, shell-quoted) and exit
  -h, --help            this text

The total process count passed to accelerate is nnodes x nproc-per-node. All nodes must see the same
run directory (shared filesystem): rank 0 writes it, and `resume=auto` continues from its last
checkpoint when a job is requeued.
EOF
}

nnodes="" node_rank="" master_addr="" master_port="" nproc="" backend="multinode" config="" run_dir=""
accelerate_bin="${ACCELERATE:-accelerate}" dry_run=0 entry="" overrides=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dry-run) dry_run=1; shift ;;
        --nnodes) need_value "$@"; nnodes="$2"; shift 2 ;;
        --node-rank) need_value "$@"; node_rank="$2"; shift 2 ;;
        --master-addr) need_value "$@"; master_addr="$2"; shift 2 ;;
        --master-port) need_value "$@"; master_port="$2"; shift 2 ;;
        --nproc-per-node) need_value "$@"; nproc="$2"; shift 2 ;;
        --backend) need_value "$@"; backend="$2"; shift 2 ;;
        --config) need_value "$@"; config="$2"; shift 2 ;;
        --run-dir) need_value "$@"; run_dir="$2"; shift 2 ;;
        --accelerate) need_value "$@"; accelerate_bin="$2"; shift 2 ;;
        --nnodes=*|--node-rank=*|--master-addr=*|--master-port=*|--nproc-per-node=*|--backend=*|--config=*|--run-dir=*|--accelerate=*)
            key="${1%%=*}"; value="${1#*=}"; shift; set -- "$key" "$value" "$@" ;;
        --) shift; overrides+=("$@"); break ;;
        -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
        *)
            if [[ -z "$entry" && "$1" != *=* ]]; then entry="$1"; else overrides+=("$1"); fi
            shift ;;
    esac
done

entry="${entry:-train_tokenizer}"
case "$entry" in
    train_tokenizer|train_ar|evaluate|pretokenize|sample|probe) ;;
    tokenize) ;;  # the config's name of pretokenize
    *) echo "error: unknown entry '$entry': use train_tokenizer, train_ar, evaluate, pretokenize, sample or probe" >&2; exit 2 ;;
esac

# ---- values from the environment when not given ----------------------------------------------------
nnodes="${nnodes:-${SLURM_NNODES:-${NNODES:-1}}}"
node_rank="${node_rank:-${SLURM_NODEID:-${NODE_RANK:-0}}}"
master_port="${master_port:-${MASTER_PORT:-29500}}"

if [[ -z "$master_addr" ]]; then
    if [[ -n "${MASTER_ADDR:-}" ]]; then
        master_addr="$MASTER_ADDR"
    elif [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
        master_addr="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    elif [[ -n "${SLURM_LAUNCH_NODE_IPADDR:-}" ]]; then
        master_addr="$SLURM_LAUNCH_NODE_IPADDR"
    elif [[ "$nnodes" == 1 ]]; then
        master_addr="127.0.0.1"
    else
        echo "error: no master address: pass --master-addr HOST (or run inside SLURM, or set MASTER_ADDR)" >&2
        exit 2
    fi
fi

if [[ -z "$nproc" ]]; then
    # SLURM_GPUS_ON_NODE may read "8" or "a100:8" depending on the SLURM version and the request.
    nproc="${SLURM_GPUS_ON_NODE:-${NPROC_PER_NODE:-}}"
    nproc="${nproc##*:}"
    if [[ -z "$nproc" ]] && command -v nvidia-smi >/dev/null 2>&1; then
        nproc="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    if [[ -z "$nproc" || "$nproc" == 0 ]]; then
        echo "error: processes per node unknown: pass --nproc-per-node G (or request GPUs from SLURM)" >&2
        exit 2
    fi
fi

for name in nnodes node_rank master_port nproc; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || { echo "error: $name='${!name}' is not a number" >&2; exit 2; }
done
if (( node_rank >= nnodes )); then
    echo "error: node rank $node_rank is not below the node count $nnodes" >&2
    exit 2
fi
total=$(( nnodes * nproc ))

if [[ -z "$config" ]]; then
    if [[ "$backend" == npu ]]; then config="$ROOT/launch/accelerate/npu.yaml"; else config="$ROOT/launch/accelerate/multinode.yaml"; fi
fi
[[ -f "$config" ]] || { echo "error: accelerate config $config does not exist" >&2; exit 2; }

# One run directory for every rank of every node, stable across requeues of the same SLURM job.
if [[ -z "$run_dir" ]]; then
    if [[ -n "${MERGEVQ_RUN_DIR:-}" ]]; then
        run_dir="$MERGEVQ_RUN_DIR"
    elif [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then
        run_dir="outputs/$entry/slurm_${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-0}"
    elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
        run_dir="outputs/$entry/slurm_${SLURM_JOB_ID}"   # a requeued job keeps its SLURM_JOB_ID
    fi
fi

cmd=("$accelerate_bin" launch --config_file "$config"
     --num_machines "$nnodes" --machine_rank "$node_rank"
     --main_process_ip "$master_addr" --main_process_port "$master_port"
     --num_processes "$total"
     -m "mergevq.entries.${entry/#tokenize/pretokenize}" "backend=$backend" "${overrides[@]}")

echo "multinode: node $node_rank of $nnodes, master $master_addr:$master_port, $nproc processes per node" \
     "($total in all), backend=$backend${run_dir:+, run dir $run_dir}" >&2

if (( dry_run )); then
    if [[ -n "$run_dir" ]]; then printf 'MERGEVQ_RUN_DIR=%q ' "$run_dir"; fi
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    echo
    exit 0
fi

if [[ -n "$run_dir" ]]; then export MERGEVQ_RUN_DIR="$run_dir"; fi
exec "${cmd[@]}"
