#!/usr/bin/env bash
# Distributed training with torchrun (one process per GPU), for mmdet, mmseg and mmdet3d configs.
#
#   tools/dist_train.sh CONFIG GPUS [train.py arguments...]
#
# Several machines: run the same command on each, with the same NNODES, MASTER_ADDR and PORT, and
# NODE_RANK = 0 .. NNODES-1.
#   NNODES       number of machines (default 1)
#   NODE_RANK    rank of this machine (default 0)
#   MASTER_ADDR  address of the NODE_RANK=0 machine (default 127.0.0.1)
#   PORT         a free TCP port on it (default 29500)
# Example, 2 machines x 8 GPUs:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 tools/dist_train.sh CONFIG 8     # on 10.0.0.1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 tools/dist_train.sh CONFIG 8     # on the other one
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG GPUS [train.py arguments...]" >&2
  exit 2
fi
CONFIG=$1
GPUS=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
TOOLS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}

PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$TOOLS/train.py" \
    "$CONFIG" \
    --launcher pytorch "$@"
