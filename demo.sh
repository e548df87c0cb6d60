#!/usr/bin/env bash
# Quick start: train a small Mixture-of-Experts Transformer-XL on the enwik8 sample shipped in samples/,
# evaluate it on the sample's test split and plot its curves. A few minutes on a 2-core CPU; a GPU is used if
# there is one. Everything goes to ${DEMO_DIR:-demo_run}/ (data/ for the prepared corpus, work/ for the run);
# each call starts a fresh run. Extra arguments go to train.py (e.g. bash demo.sh --max_step 200).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
OUT=${DEMO_DIR:-demo_run}
# Only ever delete or rewrite what the demo made: a directory that holds anything else is left alone, the default
# demo_run/ too (the demo marks the directories it makes). A symbolic link is never followed: the demo's own
# directory is a real one, made here.
if [[ -L $OUT || ( -e $OUT && ! -d $OUT ) ]]; then
    echo "demo.sh: error: $OUT is not a directory (a link or a file): it is left alone: remove it, or set DEMO_DIR to a new or empty directory" >&2
    exit 2
fi
if [[ -e $OUT && ! -f $OUT/.made-by-demo.sh && -n $(ls -A "$OUT" 2>/dev/null) ]]; then
    echo "demo.sh: error: $OUT already holds files that demo.sh did not make; they are left alone: set DEMO_DIR to a new or empty directory" >&2
    exit 2
fi
mkdir -p "$OUT" && touch "$OUT/.made-by-demo.sh"
# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads slow a step down tenfold.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# PY: a Python with requirements.txt installed (an activated environment, python3, or a .venv made here).
source utils/python_env.sh
use_python requirements.txt

if [[ ! -f $OUT/data/test.txt ]]; then
    echo "== Preparing samples/enwik8-sample.zip (1.2 MB of Wikipedia XML) into $OUT/data"
    "$PY" prep_enwik8.py --input samples/enwik8-sample.zip --out "$OUT/data" --valid 100000 --test 100000 \
        --no-raw --force
fi

# The GPU and its precision where there is one, bf16 on CPUs with AMX, fp32 on other CPUs (utils/exp_utils.py).
DEVICE_FLAGS=$("$PY" -c 'from utils.exp_utils import demo_device_flags; print(" ".join(demo_device_flags()))')

rm -rf "$OUT/work"
echo "== Training a 4-layer Transformer-XL with 8 experts (top-2) in every layer ${DEVICE_FLAGS:+($DEVICE_FLAGS)}"
"$PY" train.py --data "$OUT/data" --dataset enwik8 --work_dir "$OUT/work" $DEVICE_FLAGS \
    --n_layer 4 --d_model 128 --n_head 4 --d_head 32 --d_inner 256 \
    --moe --moe-num-expert 8 --moe-top-k 2 \
    --tgt_len 64 --mem_len 64 --eval_tgt_len 64 --batch_size 16 \
    --lr 0.002 --warmup_step 50 --max_step 500 --log-interval 50 --eval-interval 250 --save-interval 250 \
    "$@"

echo "== Evaluating on the test split with a longer memory"
"$PY" eval.py --work_dir "$OUT/work" --split test --tgt_len 64 --mem_len 256 --clamp_len 256 --same_length

echo "== Plotting"
"$PY" plot.py --work_dir "$OUT/work"

"$PY" - "$OUT/work" <<'EOF'
import json, os, sys
work = sys.argv[1]
bpc = json.load(open(os.path.join(work, 'eval.json')))['test']['bpc']
print(f'\nTest bpc of the demo model: {bpc:.3f} (8 bits per character is knowing nothing)')
plots = [os.path.join(work, name) for name in ('curves.png', 'moe_load.png')]
print('Plots: ' + ', '.join(path for path in plots if os.path.exists(path)))
print(f'Run directory (log.txt, metrics.jsonl, model.pt, checkpoint.pt): {work}')
EOF
if [[ $PY == "$PY_ENV_ROOT/.venv/bin/python" ]]; then
    echo 'Python: the packages are in .venv: `source .venv/bin/activate` in a new shell, then the README'"'"'s python commands run as written'
fi
echo 'Next: the "First hour" of README.md'
