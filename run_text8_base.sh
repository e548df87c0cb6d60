#!/bin/bash
# text8, base model: 12 layers, d_model 512.
# The original's hyperparameters, meant for GPUs (4 GPUs); the paper reports no base figure on text8 (large: 1.08 bpc).
# Usage: bash run_text8_base.sh train|eval [more flags, e.g. --work_dir DIR]; flags given later win.
# SIZE=tiny bash run_text8_base.sh train|eval ...: the same run at the Quick start's scale, minutes on a CPU (utils/launch.sh).
# Data: ${DATA_ROOT:-../data}/text8/ (relative paths are taken from this repository, as getdata.sh does).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/utils/launch.sh"   # DATA (from DATA_ROOT), run_mode (python, or torchrun: --multi_gpu, NPROC)

TRAIN_FLAGS=(
    --cuda
    --data "$DATA/text8/"
    --dataset text8
    --n_layer 12
    --d_model 512
    --n_head 8
    --d_head 64
    --d_inner 2048
    --dropout 0.1
    --dropatt 0.0
    --optim adam
    --lr 0.00025
    --warmup_step 0
    --max_step 400000
    --tgt_len 512
    --mem_len 512
    --eval_tgt_len 128
    --batch_size 22
    --multi_gpu
    --gpu0_bsz 4
)
EVAL_FLAGS=(
    --cuda
    --data "$DATA/text8/"
    --dataset text8
    --tgt_len 80
    --mem_len 2100
    --clamp_len 820
    --same_length
    --split test
)
run_mode "$@"
