"""Plain-data checkpoints: atomic writes that survive SIGKILL, loads that never run code, clear errors."""
import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from utils import checkpoint as ckpt
from utils import files


def test_round_trip_of_plain_data(tmp_path):
    state = {'format': ckpt.FORMAT, 'weights': torch.arange(6.).view(2, 3), 'step': 7, 'name': 'x',
             'nested': {'list': [1, 2.5, None], 'tuple': (1, 'a')}}
    path = tmp_path / 'c.pt'
    ckpt.atomic_save(state, path)
    loaded = ckpt.load(path)
    assert torch.equal(loaded['weights'], state['weights'])
    assert loaded['nested'] == state['nested'] and loaded['step'] == 7
    assert os.listdir(tmp_path) == ['c.pt']  # no temporary file left behind


def save_half_then_raise(monkeypatch, error):
    """torch.save writes the start of a file, then fails with `error`."""
    def save(obj, f):
        f.write(b'PK\x03\x04 partial')
        raise error
    monkeypatch.setattr(ckpt.torch, 'save', save)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'c.pt'
    ckpt.atomic_save({'format': ckpt.FORMAT, 'step': 1}, path)
    save_half_then_raise(monkeypatch, OSError('disk full'))
    with pytest.raises(OSError):
        ckpt.atomic_save({'format': ckpt.FORMAT, 'step': 2}, path)
    assert ckpt.load(path)['step'] == 1
    assert os.listdir(tmp_path) == ['c.pt']


def test_a_full_disk_is_said_in_one_line(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as `unexpected pos`: the error says what happened and what is kept."""
    path = tmp_path / 'c.pt'
    ckpt.atomic_save({'format': ckpt.FORMAT, 'step': 1}, path)
    save_half_then_raise(monkeypatch, RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos '
                                                   '791616 vs 791508'))
    monkeypatch.setattr(files, 'disk_full', lambda directory: True)
    with pytest.raises(files.WriteError) as error:
        ckpt.atomic_save({'format': ckpt.FORMAT, 'step': 2}, path)
    assert str(error.value) == (f'no space left on device writing {path}: the previous file is kept; free some '
                                'space and run again')
    assert ckpt.load(path)['step'] == 1 and os.listdir(tmp_path) == ['c.pt']
    monkeypatch.setattr(files, 'disk_full', lambda directory: False)  # the real errno says it too
    monkeypatch.setattr(ckpt.torch, 'save', lambda obj, f: (_ for _ in ()).throw(OSError(errno.ENOSPC, 'No space')))
    with pytest.raises(files.WriteError, match='^no space left on device writing'):
        ckpt.atomic_save({'format': ckpt.FORMAT, 'step': 2}, path)


def test_sigkill_during_saves_leaves_a_complete_checkpoint(tmp_path):
    """A process saving 8 MB checkpoints in a loop is killed at several moments; the file always loads whole."""
    path = tmp_path / 'c.pt'
    script = textwrap.dedent(f"""
        import torch
        from utils import checkpoint as ckpt
        for i in range(10 ** 6):
            ckpt.atomic_save({{'format': ckpt.FORMAT, 'i': i, 'blob': torch.full((2 ** 21,), float(i))}}, {str(path)!r})
            print(i, flush=True)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for delay in (0.05, 0.23):
        proc = subprocess.Popen([sys.executable, '-c', script], cwd=root, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline()  # at least one save finished
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        loaded = ckpt.load(path)
        assert torch.equal(loaded['blob'], torch.full((2 ** 21,), float(loaded['i'])))


class Exploit:
    def __reduce__(self):
        return (os.system, ('touch pwned',))


def test_pickled_objects_are_refused_without_running_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({'format': ckpt.FORMAT, 'model': Exploit()}, 'evil.pt')
    with pytest.raises(ckpt.CheckpointError, match='pickled Python objects'):
        ckpt.load('evil.pt')
    assert not os.path.exists('pwned')
    torch.save(torch.nn.Linear(2, 2), 'module.pt')  # the original's whole-model checkpoints
    with pytest.raises(ckpt.CheckpointError, match='not plain data'):
        ckpt.load('module.pt')


def test_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match='does not exist'):
        ckpt.load(tmp_path / 'missing.pt')
    good = tmp_path / 'good.pt'
    ckpt.atomic_save({'format': ckpt.FORMAT, 'w': torch.zeros(1000)}, good)
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ckpt.CheckpointError, match=r'truncated.pt is unreadable \(RuntimeError: PytorchStreamReader '
                                                   r'failed reading zip archive: failed finding central directory\): '):
        ckpt.load(truncated)
    # Bytes that are no pickle at all are damaged, not pickled objects (torch's error names weights_only for both)
    noise = tmp_path / 'noise.pt'
    noise.write_bytes(bytes(range(256))[::-3] * 4)
    with pytest.raises(ckpt.CheckpointError, match=r'noise.pt is unreadable \(UnpicklingError: Unsupported operand'):
        ckpt.load(noise)
    text = tmp_path / 'text.pt'
    text.write_text('hi\n')
    with pytest.raises(ckpt.CheckpointError, match=r'text.pt is unreadable \(KeyError: '):
        ckpt.load(text)
    foreign = tmp_path / 'foreign.pt'
    torch.save({'state_dict': {}}, foreign)
    with pytest.raises(ckpt.CheckpointError, match='not a checkpoint written by this project'):
        ckpt.load(foreign)
    for error in (ckpt.CheckpointError('x'),):
        assert isinstance(error, ValueError)  # the drivers turn ValueErrors into exit code 2


@pytest.mark.parametrize('what, obj, message', [
    ('model', {'model_state': {}}, "nothing under 'config'"),
    ('model', {'config': {}, 'model_state': {}, 'args': ['--lr', '1']}, "a list under 'args'"),
    ('model', {'config': 'big', 'model_state': {}}, "a str under 'config'"),
    ('optimizer', {'step': 3}, "nothing under 'optimizer_state'"),
    ('checkpoint', {'config': {}, 'model_state': {}, 'optimizer_state': {}, 'scaler_state': {}, 'window': {},
                    'args': {}}, 'but no plateau, step, epoch'),
])
def test_hand_made_checkpoints_with_the_format_tag_are_one_line(what, obj, message, tmp_path):
    path = tmp_path / 'c.pt'
    torch.save({'format': ckpt.FORMAT, **obj}, path)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_run_file(path, what)
    assert message in str(error.value) and 'use a file train.py wrote' in str(error.value)


def test_config_check_says_what_differs():
    saved = {'n_layer': 12, 'd_model': 512, 'cutoffs': (1, 2), 'moe': True}
    now = {'n_layer': 2, 'd_model': 512, 'cutoffs': [1, 2], 'moe': True}
    assert ckpt.config_diff(saved, now) == ["n_layer: 12 in the checkpoint, 2 now"]
    assert ckpt.config_diff(saved, now, keys=['d_model']) == []
    with pytest.raises(ckpt.CheckpointError, match=r"c.pt does not match this run: moe: True in the checkpoint, "
                                                    r"absent now; n_layer: 12 in the checkpoint, 2 now"):
        ckpt.check_config(saved, {'n_layer': 2, 'd_model': 512, 'cutoffs': [1, 2]}, 'c.pt')


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    ckpt.atomic_save({'format': ckpt.FORMAT, 'rng': ckpt.rng_state()}, tmp_path / 'r.pt')
    expected = (random.random(), np.random.normal(), np.random.random(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.load(tmp_path / 'r.pt')['rng'])
    got = (random.random(), np.random.normal(), np.random.random(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


@pytest.mark.parametrize('saved_by', ['this version', 'older versions'])
def test_only_the_current_cuda_device_rng_state_is_saved_and_restored(monkeypatch, saved_by):
    """Each torchrun rank drives its own GPU and sees them all; a resume may see fewer GPUs than the run that
    saved. Faked CUDA with 2 visible devices, the current one being 1."""
    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': states[1])
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device='cuda': restored.append(state))
    for name in ('get_rng_state_all', 'set_rng_state_all'):
        monkeypatch.setattr(torch.cuda, name, lambda *a, name=name: pytest.fail(f'{name} touches every device'))
    state = ckpt.rng_state()
    assert torch.equal(state['cuda'], states[1])
    if saved_by == 'older versions':
        state['cuda'] = [states[0], states[1]]
    ckpt.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], states[1])
    state['cuda'] = [states[0]]  # saved with one GPU, resumed on device 1: that device keeps its state
    ckpt.set_rng_state(state)
    assert len(restored) == 1


def test_load_weights_reports_mismatches():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    state = {'0.weight': torch.zeros(4, 2), '0.bias': torch.zeros(3), 'extra': torch.zeros(1)}
    with pytest.raises(ckpt.CheckpointError, match=r'm.pt do not fit the model: .*extra.*size mismatch'):
        ckpt.load_weights(model, state, 'm.pt')


def test_exploit_class_would_run_if_unpickled(tmp_path, monkeypatch):
    # Guards the test above: the payload really executes under a plain pickle load.
    monkeypatch.chdir(tmp_path)
    pickle.loads(pickle.dumps(Exploit()))
    assert os.path.exists('pwned')
