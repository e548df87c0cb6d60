#!/bin/bash
# WikiText-103, large model: 18 layers, d_model 1024, adaptive input and softmax (div_val 4), 257M parameters.
# The original's hyperparameters, meant for GPUs (the paper used TPUs); the paper reports 18.3 test perplexity.
# Usage: bash run_wt103_large.sh train|eval [more flags, e.g. --work_dir DIR]; flags given later win.
# SIZE=tiny bash run_wt103_large.sh train|eval ...: the same run at the Quick start's scale, minutes on a CPU (utils/launch.sh).
# Data: ${DATA_ROOT:-../data}/wikitext-103/ (relative paths are taken from this repository, as getdata.sh does).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/utils/launch.sh"   # DATA (from DATA_ROOT), run_mode (python, or torchrun: --multi_gpu, NPROC)

TRAIN_FLAGS=(
    --cuda
    --data "$DATA/wikitext-103/"
    --dataset wt103
    --adaptive
    --div_val 4
    --n_layer 18
    --d_model 1024
    --n_head 16
    --d_head 64
    --d_inner 4096
    --dropout 0.2
    --dropatt 0.2
    --optim adam
    --lr 0.00025
    --warmup_step 16000
    --max_step 4000000
    --tgt_len 384
    --mem_len 384
    --eval_tgt_len 128
    --batch_size 128
    --multi_gpu
    --gpu0_bsz 0
)
EVAL_FLAGS=(
    --cuda
    --data "$DATA/wikitext-103/"
    --dataset wt103
    --tgt_len 128
    --mem_len 1600
    --clamp_len 1000
    --same_length
    --split test
)
run_mode "$@"
