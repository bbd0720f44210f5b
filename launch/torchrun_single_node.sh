#!/usr/bin/env bash
# Train on one node with one process per GPU (or NPROC CPU processes when there is no GPU).
#
#   launch/torchrun_single_node.sh --config configs/tiny_demo.toml [section.key=value ...]
#   NPROC=2 launch/torchrun_single_node.sh --config configs/tiny_demo.toml train.device=cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count() or 1)')
fi
# Each CPU rank gets an equal share of the cores rather than all of them (oversubscription slows
# every rank down).
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  export OMP_NUM_THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m training.main "$@"
