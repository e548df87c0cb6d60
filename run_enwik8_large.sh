#!/bin/bash
# enwik8, large model: 24 layers, d_model 1024, 277M parameters.
# The original's hyperparameters, meant for GPUs (the paper used TPUs; 8+ large GPUs here); the paper reports 0.99 bpc on the test set.
# Usage: bash run_enwik8_large.sh train|eval [more flags, e.g. --work_dir DIR]; flags given later win.
# SIZE=tiny bash run_enwik8_large.sh train|eval ...: the same run at the Quick start's scale, minutes on a CPU (utils/launch.sh).
# Data: ${DATA_ROOT:-../data}/enwik8/ (relative paths are taken from this repository, as getdata.sh does).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/utils/launch.sh"   # DATA (from DATA_ROOT), run_mode (python, or torchrun: --multi_gpu, NPROC)

TRAIN_FLAGS=(
    --cuda
    --data "$DATA/enwik8/"
    --dataset enwik8
    --n_layer 24
    --d_model 1024
    --n_head 8
    --d_head 128
    --d_inner 3072
    --dropout 0.15
    --dropatt 0.15
    --optim adam
    --lr 0.00025
    --warmup_step 4000
    --max_step 400000
    --tgt_len 768
    --mem_len 768
    --eval_tgt_len 128
    --batch_size 64
    --multi_gpu
    --gpu0_bsz 0
)
EVAL_FLAGS=(
    --cuda
    --data "$DATA/enwik8/"
    --dataset enwik8
    --tgt_len 128
    --mem_len 3800
    --clamp_len 1000
    --same_length
    --split test
)
run_mode "$@"
