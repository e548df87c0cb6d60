# Sourced by the run_*.sh scripts after they set HERE (this repository's directory); they then set
# TRAIN_FLAGS and EVAL_FLAGS and call run_mode "$@".
# DATA: the data root, ${DATA_ROOT:-../data}; relative paths are taken from this repository, as getdata.sh does.
DATA=${DATA_ROOT:-../data}
[[ $DATA == /* ]] || DATA=$HERE/$DATA
PY=${PYTHON:-python}

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
run_mode() {
    local amp=(${AMP:+--amp "$AMP"})
    case $1 in
        train) echo 'Run training...'; launcher "${TRAIN_FLAGS[@]}" "${@:2}"
               "${LAUNCH[@]}" "$HERE/train.py" "${TRAIN_FLAGS[@]}" ${amp[@]+"${amp[@]}"} "${@:2}" ;;
        eval) echo 'Run evaluation...'; launcher "${EVAL_FLAGS[@]}" "${@:2}"
              "${LAUNCH[@]}" "$HERE/eval.py" "${EVAL_FLAGS[@]}" "${@:2}" ;;
        *) echo "usage: bash $(basename "$0") train|eval [flags]" >&2; exit 2 ;;
    esac
}
