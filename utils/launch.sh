# Sourced by the run_*.sh scripts after they set HERE (this repository's directory); they then set
# TRAIN_FLAGS and EVAL_FLAGS (and TINY_FLAGS, see below) and call run_mode "$@".
# DATA: the data root, ${DATA_ROOT:-../data}; relative paths are taken from this repository, as getdata.sh does.
# The Python is the one the Quick start installed into (utils/python_env.sh: PYTHON, the activated virtual or
# conda environment, this repository's .venv, or python3); none with torch is a one-line error.
DATA=${DATA_ROOT:-../data}
[[ $DATA == /* ]] || DATA=$HERE/$DATA
source "$HERE/utils/python_env.sh"
# Idle OpenMP threads sleep instead of spinning (as demo.sh): on a busy CPU spinning threads slow a step tenfold.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# SIZE=tiny: the script's run at the Quick start's scale, to try it end to end on a CPU in minutes: a 4-layer
# model of d_model 128, 200 steps with a line every 10 and a validation every 100 (each at most 50 batches), and
# evaluation with a memory of 256. The data, the dataset's options (adaptive softmax, ...) and the model family
# stay the script's; TINY_FLAGS adds a script's own (the MoE script: 8 experts). Flags given after the mode
# still win. Unset (or SIZE=full): the original's hyperparameters.
TINY_TRAIN_FLAGS=(--n_layer 4 --d_model 128 --n_head 4 --d_head 32 --d_inner 256 --d_embed 128
                  --tgt_len 64 --mem_len 64 --eval_tgt_len 64 --batch_size 16 --lr 0.002 --warmup_step 20
                  --max_step 200 --log-interval 10 --eval-interval 100 --save-interval 100 --max_eval_steps 50)
TINY_EVAL_FLAGS=(--tgt_len 64 --mem_len 256 --clamp_len 256)

# size_flags: sets SIZE_TRAIN and SIZE_EVAL, the flags of SIZE that follow the script's own.
size_flags() {
    SIZE_TRAIN=() SIZE_EVAL=()
    case ${SIZE:-full} in
        full) ;;
        tiny) SIZE_TRAIN=("${TINY_TRAIN_FLAGS[@]}" ${TINY_FLAGS[@]+"${TINY_FLAGS[@]}"})
              SIZE_EVAL=("${TINY_EVAL_FLAGS[@]}") ;;
        *) echo "error: SIZE=$SIZE: unknown; SIZE=tiny tries the run at the Quick start's scale, SIZE=full (or unset) is the original's" >&2
           exit 2 ;;
    esac
}

# launcher FLAGS...: sets LAUNCH, the command that runs a script with FLAGS.
# NPROC=N launches N processes on this machine through torchrun (DDP, --batch_size stays the global batch);
# TORCHRUN_ARGS adds torchrun flags, e.g. for several machines (docs/distributed.md).
# Without NPROC, the original's --multi_gpu (nn.DataParallel over every GPU) becomes torchrun with one process
# per visible GPU (CUDA_VISIBLE_DEVICES counts), one line saying so; with no GPU it stays one CPU process.
launcher() {
    local nproc=$NPROC
    if [[ -z $nproc && -z $TORCHRUN_ARGS && " $* " == *' --multi_gpu '* ]]; then
        # device_count() asks the driver without initialising CUDA, so the processes started next can.
        nproc=$("$PY" -c 'import torch; print(torch.cuda.device_count())') || exit 2
        if (( nproc > 1 )); then
            echo "--multi_gpu: torchrun with $nproc processes, one per visible GPU (NPROC=N to choose)"
        else
            echo "--multi_gpu: $nproc GPU visible: one process"
            nproc=1
        fi
    fi
    LAUNCH=("$PY")
    if [[ ${nproc:-1} != 1 || -n $TORCHRUN_ARGS ]]; then
        # --standalone: a rendezvous on a free local port, unless TORCHRUN_ARGS sets up another.
        LAUNCH+=(-m torch.distributed.run $([[ -z $TORCHRUN_ARGS ]] && echo --standalone)
                 --nproc_per_node "${nproc:-1}" $TORCHRUN_ARGS)
    fi
}

# run_mode MODE [FLAGS...]: `train` runs train.py with the script's TRAIN_FLAGS, `eval` eval.py with its
# EVAL_FLAGS, each followed by FLAGS (later flags win); anything else prints the usage and exits 2.
# AMP=bf16 (or fp16) trains under autocast; unset, in fp32 as the original (TF32 products on Ampere+ GPUs).
# SIZE=tiny runs the script at the Quick start's scale (above).
run_mode() {
    local amp=(${AMP:+--amp "$AMP"})
    case $1 in
        train|eval) size_flags; installed_python ;;
        *) echo "usage: [SIZE=tiny] bash $(basename "$0") train|eval [flags]" >&2; exit 2 ;;
    esac
    case $1 in
        train) echo "Run training...${SIZE_TRAIN[0]+ (SIZE=$SIZE)}"
               local flags=("${TRAIN_FLAGS[@]}" ${SIZE_TRAIN[@]+"${SIZE_TRAIN[@]}"})
               launcher "${flags[@]}" "${@:2}"
               "${LAUNCH[@]}" "$HERE/train.py" "${flags[@]}" ${amp[@]+"${amp[@]}"} "${@:2}" ;;
        eval) echo "Run evaluation...${SIZE_EVAL[0]+ (SIZE=$SIZE)}"
              local flags=("${EVAL_FLAGS[@]}" ${SIZE_EVAL[@]+"${SIZE_EVAL[@]}"})
              launcher "${flags[@]}" "${@:2}"
              "${LAUNCH[@]}" "$HERE/eval.py" "${flags[@]}" "${@:2}" ;;
    esac
}
