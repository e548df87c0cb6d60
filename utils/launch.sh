# Sourced by the run_*.sh scripts after they set HERE (this repository's directory).
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
