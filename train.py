# coding: utf-8
"""Train a Transformer-XL language model whose feed-forwards can be Mixtures of Experts (--moe).

The original train.py's command line (same flags and defaults) on today's PyTorch, plus FastMoE's --moe flags.
What changed (docs/differences.md lists every flag whose meaning differs): --work_dir is the run directory
itself; mixed precision is torch.autocast with a gradient scaler instead of apex; WORK_DIR/checkpoint.pt holds
the whole training state, so --restart continues a killed run exactly; checkpoints are plain data; metrics.jsonl
sits next to log.txt.

Several processes (`torchrun --nproc_per_node N train.py ...`, see run/distributed.py): --batch_size is the
global batch, each rank trains on its columns with DDP, rank 0 logs and writes; --expert-parallel splits the experts.

Exit codes: 0 done, 1 the loss stayed non-finite, 2 bad input (one line on stderr, nothing written),
3 another process of a distributed run died or timed out, 143 stopped by SIGTERM after saving checkpoint.pt.

The code is in run/ (this file is its command, so that study.py and the benchmarks run the same code):
run/options.py has the flags, run/trainer.py's Trainer.train_step the step, run/training.py's main the run
from data to test.
"""
from run.distributed import exit_process
from run.training import main


if __name__ == '__main__':
    exit_process(main())
