#!/usr/bin/env bash
# Train on one node with one process per GPU (or NPROC CPU processes when there is no GPU).
#
#   launch/torchrun_single_node.sh --config configs/tiny_demo.toml [section.key=value ...]
#   NPROC=2 launch/torchrun_single_node.sh --config configs/tiny_demo.toml engine.device=cpu
#   MAX_RESTARTS=3 launch/torchrun_single_node.sh --config X.toml checkpoint.resume=latest
#
# MAX_RESTARTS (default 0): when a rank dies, torchrun stops the others and starts them all again,
# up to this many times; with checkpoint.resume=latest each new round resumes from the newest checkpoint.
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
# torch 2.15's torchrun keeps one rendezvous store for all restart rounds and the ranks of a new
# round read their dead predecessors' addresses from it (gloo: "connectFullMesh failed ...
# Connection refused"). Without sharing, rank 0 of each round hosts a fresh store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  --max-restarts "${MAX_RESTARTS:-0}" -m training.main "$@"
