"""How tests/data/v1_run/ was written: train.py at commit ad660eb (before model.pt stored a typed
configuration), on the corpus tests/conftest.write_corpus(sizes=V1_SIZES) makes. The files are test data for
tests/test_model_file.py, which loads and resumes them with today's code; run this script only to see how they
were made (with today's code it writes today's format).

    cd tests && ../venv/bin/python data/make_v1_run.py    # writes data/v1_run/{model.pt,checkpoint.pt,expected.json}
"""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]

from conftest import write_corpus  # noqa: E402

V1_SIZES = (6000, 1500, 1500)
# A 1-layer MoE model small enough for a few-KB file, with options that are not the defaults.
V1_FLAGS = ['--dataset', 'enwik8', '--n_layer', '1', '--d_model', '8', '--n_head', '2', '--d_head', '4',
            '--d_inner', '8', '--tgt_len', '8', '--mem_len', '8', '--eval_tgt_len', '8', '--batch_size', '2',
            '--log-interval', '1', '--eval-interval', '2', '--max_eval_steps', '3', '--lr', '0.01',
            '--scheduler', 'constant', '--moe', '--moe-num-expert', '3', '--moe-top-k', '2',
            '--moe-gate', 'gshard', '--moe-shared-expert', '1', '--dropout', '0.1', '--seed', '7']
V1_STEPS, V1_RESUMED_STEPS = 3, 6


def train(*argv):
    return subprocess.run([sys.executable, str(HERE.parent.parent / 'train.py'), *argv],
                          env={'OMP_NUM_THREADS': '1', 'PATH': ''}, capture_output=True).returncode


def main():
    out = HERE / 'v1_run'
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / 'corpus', sizes=V1_SIZES)
        work = Path(tmp) / 'run'
        base = ['--data', str(corpus), '--work_dir', str(work), *V1_FLAGS]
        torch.set_num_threads(1)
        assert train(*base, '--max_step', str(V1_STEPS)) == 0
        out.mkdir(exist_ok=True)
        for name in ('model.pt', 'checkpoint.pt'):
            shutil.copy(work / name, out / name)
        assert train(*base, '--max_step', str(V1_RESUMED_STEPS), '--restart') == 0
        records = [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]
        resumed = [(r['step'], r['split'], r['loss']) for r in records if r['step'] > V1_STEPS]

        saved = torch.load(out / 'model.pt', weights_only=True)
        from mem_transformer import MemTransformerLM
        model = MemTransformerLM(**saved['config'])
        model.load_state_dict(saved['model_state'])
        model.eval()
        data = torch.arange(24).remainder(saved['config']['n_token']).view(12, 2)
        with torch.no_grad():
            loss, *mems = model(data[:6], data[1:7])
            loss2, *_ = model(data[6:11], data[7:12], *mems)
        expected = {'commit': 'ad660eb', 'resumed': resumed,
                    'model_losses': [loss.tolist(), loss2.tolist()], 'flags': V1_FLAGS,
                    'corpus_sizes': list(V1_SIZES), 'steps': V1_STEPS, 'resumed_steps': V1_RESUMED_STEPS}
        (out / 'expected.json').write_text(json.dumps(expected, indent=1) + '\n')


if __name__ == '__main__':
    main()
