# Sourced by the run_*.sh scripts after they set HERE (this repository's directory); they then set
# TRAIN_FLAGS and EVAL_FLAGS and call run_mode "$@".
# DATA: the data root, ${DATA_ROOT:-../data}; relative paths are taken from this repository, as getdata.sh does.
DATA=${DATA_ROOT:-../data}
[[ $DATA == /* ]] || DATA=$HERE/$DATA
# LAUNCH: the command that runs a script. NPROC=N launches N processes on this machine through torchrun
# (DDP, --batch_size stays the global batch); TORCHRUN_ARGS adds torchrun flags, e.g. for several machines
# (README, "Multiple GPUs and machines").
LAUNCH=(${PYTHON:-python})
if [[ ${NPROC:-1} != 1 || -n $TORCHRUN_ARGS ]]; then
    LAUNCH+=(-m torch.distributed.run --nproc_per_node "${NPROC:-1}" $TORCHRUN_ARGS)
fi

# run_mode MODE [FLAGS...]: `train` runs train.py with the script's TRAIN_FLAGS, `eval` eval.py with its
# EVAL_FLAGS, each followed by FLAGS (later flags win); anything else prints the usage and exits 2.
run_mode() {
    case $1 in
        train) echo 'Run training...'; "${LAUNCH[@]}" "$HERE/train.py" "${TRAIN_FLAGS[@]}" "${@:2}" ;;
        eval) echo 'Run evaluation...'; "${LAUNCH[@]}" "$HERE/eval.py" "${EVAL_FLAGS[@]}" "${@:2}" ;;
        *) echo "usage: bash $(basename "$0") train|eval [flags]" >&2; exit 2 ;;
    esac
}
