#!/usr/bin/env bash
# Distributed testing with torchrun (one process per GPU), for mmdet, mmseg and mmdet3d configs.
#
#   tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py arguments...]
#
# Several machines: run the same command on each, with the same NNODES, MASTER_ADDR and PORT, and
# NODE_RANK = 0 .. NNODES-1.
#   NNODES       number of machines (default 1)
#   NODE_RANK    rank of this machine (default 0)
#   MASTER_ADDR  address of the NODE_RANK=0 machine (default 127.0.0.1)
#   PORT         a free TCP port on it (default 29500)
set -euo pipefail

if [ $# -lt 3 ]; then
  echo "usage: $0 CONFIG CHECKPOINT GPUS [test.py arguments...]" >&2
  exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
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
    "$TOOLS/test.py" \
    "$CONFIG" \
    "$CHECKPOINT" \
    --launcher pytorch "$@"
