#!/bin/bash
# One Billion Word, base model: 18 layers, d_model 1024, adaptive input and softmax (div_val 4), 0.46B parameters.
# The original's hyperparameters, meant for GPUs (the paper used TPUs); the paper reports 23.5 test perplexity.
# Usage: bash run_lm1b_base.sh train|eval [more flags, e.g. --work_dir DIR]; flags given later win.
# SIZE=tiny bash run_lm1b_base.sh train|eval ...: the same run at the Quick start's scale, minutes on a CPU (utils/launch.sh).
# Data: ${DATA_ROOT:-../data}/one-billion-words/ (relative paths are taken from this repository, as getdata.sh does).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/utils/launch.sh"   # DATA (from DATA_ROOT), run_mode (python, or torchrun: --multi_gpu, NPROC)

TRAIN_FLAGS=(
    --cuda
    --data "$DATA/one-billion-words/"
    --dataset lm1b
    --adaptive
    --n_layer 18
    --d_model 1024
    --div_val 4
    --n_head 8
    --d_head 128
    --d_inner 4096
    --dropout 0.0
    --dropatt 0.0
    --optim adam
    --warmup_step 20000
    --max_step 500000
    --lr 0.00025
    --tgt_len 32
    --mem_len 32
    --eval_tgt_len 32
    --batch_size 224
    --multi_gpu
    --gpu0_bsz 32
)
EVAL_FLAGS=(
    --cuda
    --data "$DATA/one-billion-words/"
    --dataset lm1b
    --batch_size 64
    --tgt_len 32
    --mem_len 128
    --split test
    --same_length
)
run_mode "$@"
