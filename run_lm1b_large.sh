#!/bin/bash
# One Billion Word, large model: 24 layers, d_model 1280, adaptive input and softmax (div_val 4), 0.8B parameters.
# The original's hyperparameters, meant for GPUs (the paper used TPUs); the paper reports 21.8 test perplexity.
# Usage: bash run_lm1b_large.sh train|eval [more flags, e.g. --work_dir DIR]; flags given later win.
# SIZE=tiny bash run_lm1b_large.sh train|eval ...: the same run at the Quick start's scale, minutes on a CPU (utils/launch.sh).
# Data: ${DATA_ROOT:-../data}/one-billion-words/ (relative paths are taken from this repository, as getdata.sh does).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/utils/launch.sh"   # DATA (from DATA_ROOT), run_mode (python, or torchrun: --multi_gpu, NPROC)

TRAIN_FLAGS=(
    --cuda
    --data "$DATA/one-billion-words/"
    --dataset lm1b
    --adaptive
    --div_val 4
    --n_layer 24
    --d_model 1280
    --n_head 16
    --d_head 80
    --d_inner 8192
    --dropout 0.05
    --dropatt 0.05
    --optim adam
    --warmup_step 30000
    --max_step 1200000
    --lr 0.00025
    --tgt_len 32
    --mem_len 32
    --eval_tgt_len 32
    --batch_size 512
    --multi_gpu
    --gpu0_bsz 0
)
EVAL_FLAGS=(
    --cuda
    --data "$DATA/one-billion-words/"
    --dataset lm1b
    --batch_size 8
    --tgt_len 32
    --mem_len 128
    --split test
    --same_length
)
run_mode "$@"
