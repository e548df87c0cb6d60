#!/bin/bash
# WikiText-103, base model: 16 layers, d_model 410, adaptive softmax, 151M parameters.
# The original's hyperparameters, meant for GPUs (the paper used 4 GPUs); the paper reports 24.0 test perplexity (the original README: 24.03).
# Usage: bash run_wt103_base.sh train|eval [more flags, e.g. --work_dir DIR]; flags given later win.
# SIZE=tiny bash run_wt103_base.sh train|eval ...: the same run at the Quick start's scale, minutes on a CPU (utils/launch.sh).
# Data: ${DATA_ROOT:-../data}/wikitext-103/ (relative paths are taken from this repository, as getdata.sh does).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/utils/launch.sh"   # DATA (from DATA_ROOT), run_mode (python, or torchrun: --multi_gpu, NPROC)

TRAIN_FLAGS=(
    --cuda
    --data "$DATA/wikitext-103/"
    --dataset wt103
    --adaptive
    --n_layer 16
    --d_model 410
    --n_head 10
    --d_head 41
    --d_inner 2100
    --dropout 0.1
    --dropatt 0.0
    --optim adam
    --lr 0.00025
    --warmup_step 0
    --max_step 200000
    --tgt_len 150
    --mem_len 150
    --eval_tgt_len 150
    --batch_size 60
    --multi_gpu
    --gpu0_bsz 4
)
EVAL_FLAGS=(
    --cuda
    --data "$DATA/wikitext-103/"
    --dataset wt103
    --tgt_len 64
    --mem_len 640
    --clamp_len 400
    --same_length
    --split test
)
run_mode "$@"
