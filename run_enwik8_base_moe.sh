#!/bin/bash
# enwik8, FastMoE's MoE setting: the base model with 64 experts (d_inner 1024 each), top-2 naive gate.
# The original's hyperparameters, meant for GPUs (FastMoE ran it on GPUs); FastMoE publishes no figure for it: compare with run_enwik8_base.sh (1.06 bpc).
# Usage: bash run_enwik8_base_moe.sh train|eval [more flags, e.g. --work_dir DIR]; flags given later win.
# SIZE=tiny bash run_enwik8_base_moe.sh train|eval ...: the same run at the Quick start's scale, minutes on a CPU (utils/launch.sh).
# Data: ${DATA_ROOT:-../data}/enwik8/ (relative paths are taken from this repository, as getdata.sh does).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/utils/launch.sh"   # DATA (from DATA_ROOT), run_mode (python, or torchrun: --multi_gpu, NPROC)

TRAIN_FLAGS=(
    --cuda
    --data "$DATA/enwik8/"
    --dataset enwik8
    --n_layer 12
    --d_model 512
    --n_head 8
    --d_head 64
    --d_inner 1024
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
    --moe --moe-num-expert 64 --moe-top-k 2
)
EVAL_FLAGS=(
    --cuda
    --data "$DATA/enwik8/"
    --dataset enwik8
    --tgt_len 80
    --mem_len 2100
    --clamp_len 820
    --same_length
    --split test
)
TINY_FLAGS=(--moe-num-expert 8)   # with SIZE=tiny
run_mode "$@"
