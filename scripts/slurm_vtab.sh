#!/bin/bash
# Lily on one VTAB-1k task across 2 nodes x 4 GPUs with SLURM: `sbatch scripts/slurm_vtab.sh dtd`.
#
# Lightning's SLURM environment reads the rank, world size and master address from the variables srun sets,
# so the same command line runs on every task; only these must agree with the #SBATCH lines:
#   --trainer.num_nodes      == --nodes
#   --trainer.devices        == --ntasks-per-node == GPUs per node (--gpus-per-node)
# Batch sizes are per process: batch_size 8 x 8 processes is the paper's global batch 64. With
# model.lily.sync_routing on (the default) the routing mix is averaged over all 64 images, so the run trains
# like one GPU with batch 64. The log (slurm-<job>.out) gets plain progress lines (stdout is not a terminal),
# and runs/<task>/lily/train.log a copy of them.
#
#SBATCH --job-name=lily-vtab
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --signal=SIGUSR1@90
# ^ 90 s before the time limit SLURM sends SIGUSR1; Lightning's SLURM environment then saves a checkpoint
#   and requeues the job (requeue needs your site to allow it). Re-submitting the same command with
#   `--ckpt_path last` continues an interrupted run from runs/<task>/lily/checkpoints/last.ckpt.

set -euo pipefail
task=${1:?usage: sbatch scripts/slurm_vtab.sh TASK [extra CLI overrides...]}
shift

# Set these for your cluster: the VTAB-1k folder and the backbone weights (compute nodes are often offline).
VTAB_ROOT=${VTAB_ROOT:-$HOME/data/vtab-1k}
WEIGHTS=${WEIGHTS:-$HOME/weights/ViT-B_16.npz}

cd "${SLURM_SUBMIT_DIR:-.}"
source .venv/bin/activate

# Data-loader threads per process; the GPU does the work.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}

# The same run for fit and test: configs, data, weights, and one process per GPU on every node.
run=(
    --config configs/vit_vtab.yaml --config "configs/vtab/${task}.yaml"
    --data.init_args.root "$VTAB_ROOT" --model.weights "$WEIGHTS"
    --trainer.accelerator gpu --trainer.strategy ddp
    --trainer.num_nodes "$SLURM_JOB_NUM_NODES" --trainer.devices "$SLURM_NTASKS_PER_NODE"
    --trainer.precision bf16-mixed
)

srun python -m lily_lightning fit "${run[@]}" --data.init_args.batch_size 8 "$@"

# Test the final model on the same allocation: each test image is counted once, the batch mix is that of
# the global eval batch (eval_batch_size x processes), and rank 0 prints the RESULT line.
srun python -m lily_lightning test "${run[@]}" --data.init_args.eval_batch_size 32 --ckpt_path last "$@"
