"""A SIGKILL storm against train.py's resume, run by hand (too slow for the suite; the suite keeps
test_train.py's single kill-and-resume test):

    python tests/kill_storm.py [--kills 24] [--seed 0] [--keep DIR]

Trains a small MoE model with dropout once without interruption, then again while killing it with SIGKILL again
and again: half the kills at a random moment, half the moment a checkpoint's temporary file appears (mid-save).
After each kill the run is relaunched (--restart once checkpoint.pt exists) until it finishes. It passes when
every logged figure (step, split, loss, learning rate, expert load) equals the uninterrupted run's exactly and the
run directory ends with train.py's files only (no orphaned temporary file). Prints one summary line; exit 1 on a
difference.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import write_corpus  # noqa: E402

FLAGS = ['--dataset', 'enwik8', '--n_layer', '2', '--d_model', '64', '--n_head', '2', '--d_head', '32',
         '--d_inner', '128', '--tgt_len', '16', '--mem_len', '16', '--eval_tgt_len', '16', '--batch_size', '4',
         '--moe', '--moe-num-expert', '4', '--moe-top-k', '2', '--moe-gate', 'gshard', '--dropout', '0.1',
         '--dropatt', '0.1', '--lr', '0.002', '--max_step', '80', '--log-interval', '1', '--eval-interval', '20',
         '--max_eval_steps', '5', '--save-interval', '3']
RUN_FILES = {'checkpoint.pt', 'log.txt', 'metrics.jsonl', 'model.pt', 'optimizer.pt'}


def start(work, data, restart):
    cmd = [sys.executable, str(ROOT / 'train.py'), '--data', str(data), '--work_dir', str(work), *FLAGS]
    return subprocess.Popen(cmd + (['--restart'] if restart else []), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))


def temporary_files(work):
    return [n for n in os.listdir(work) if n not in RUN_FILES] if work.exists() else []


def figures(work):
    records = [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]
    return [(r['step'], r['split'], r['loss'], r.get('lr'), r.get('moe_load')) for r in records]


def kill_storm(work, data, n_kills, rng):
    """Kill, relaunch, until n_kills kills are done and the run then finishes; returns (kills, mid-save kills)."""
    kills = mid_save = 0
    while True:
        left = set(temporary_files(work))  # by the last kill: the new process removes them at start-up
        proc = start(work, data, restart=(work / 'checkpoint.pt').exists())
        if kills < n_kills:
            at_save = kills % 2 == 1
            deadline = time.time() + (rng.uniform(0.0, 4.0) if at_save else rng.uniform(0.5, 6.0))
            while proc.poll() is None:  # wait for the moment: a random time, or after it the next save
                if time.time() > deadline and (not at_save or any(
                        '.tmp' in n for n in set(temporary_files(work)) - left)):
                    break
                time.sleep(0.0005 if at_save else 0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                mid_save += any('.tmp' in n for n in set(temporary_files(work)) - left)  # a save cut short
                proc.stderr.close()
                continue
        code = proc.wait()
        err = proc.stderr.read()
        proc.stderr.close()
        if code != 0:
            raise SystemExit(f'the relaunched run failed with exit code {code}: {err.strip()[-500:]}')
        if kills >= n_kills:
            return kills, mid_save


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--kills', type=int, default=24)
    parser.add_argument('--seed', type=int, default=0, help='chooses the moments of the kills')
    parser.add_argument('--keep', default=None, help='work here and keep the runs (default: a temporary dir)')
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix='kill-storm-'))
    data = write_corpus(root / 'data', sizes=(60000, 4000, 4000))
    reference, work = root / 'reference', root / 'killed'
    proc = start(reference, data, restart=False)
    if proc.wait() != 0:
        raise SystemExit(f'the reference run failed: {proc.stderr.read()}')
    proc.stderr.close()
    started = time.time()
    kills, mid_save = kill_storm(work, data, args.kills, random.Random(args.seed))
    same = figures(work) == figures(reference)
    orphans = sorted(set(os.listdir(work)) - RUN_FILES)
    print(f'{kills} SIGKILLs ({mid_save} left a save cut short), {time.time() - started:.0f} s: '
          f'{len(figures(work))} logged figures {"identical to" if same else "DIFFERENT from"} the uninterrupted '
          f'run; files left: {sorted(os.listdir(work))}; orphans: {orphans or "none"}')
    return 0 if same and not orphans else 1


if __name__ == '__main__':
    sys.exit(main())
