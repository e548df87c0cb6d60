#!/bin/bash
# text8, large model: 24 layers, d_model 1024, 277M parameters.
# The original's hyperparameters, meant for GPUs (the paper used TPUs); the paper reports 1.08 bpc on the test set.
# Usage: bash run_text8_large.sh train|eval [more flags, e.g. --work_dir DIR]; flags given later win.
# SIZE=tiny bash run_text8_large.sh train|eval ...: the same run at the Quick start's scale, minutes on a CPU (utils/launch.sh).
# Data: ${DATA_ROOT:-../data}/text8/ (relative paths are taken from this repository, as getdata.sh does).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/utils/launch.sh"   # DATA (from DATA_ROOT), run_mode (python, or torchrun: --multi_gpu, NPROC)

TRAIN_FLAGS=(
    --cuda
    --data "$DATA/text8/"
    --dataset text8
    --n_layer 24
    --d_model 1024
    --n_head 8
    --d_head 128
    --d_inner 3072
    --dropout 0.15
    --dropatt 0.15
    --optim adam
    --lr 0.00025
    --tgt_len 768
    --mem_len 768
    --eval_tgt_len 128
    --batch_size 64
    --max_step 400000
)
EVAL_FLAGS=(
    --cuda
    --data "$DATA/text8/"
    --dataset text8
    --tgt_len 128
    --mem_len 3800
    --clamp_len 1000
    --same_length
    --split test
)
run_mode "$@"
