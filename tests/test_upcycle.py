"""Sparse upcycling (run/upcycle.py, convert_checkpoint.py --upcycle): a trained dense run becomes an MoE
run whose evaluation loss is the dense one's (naive, noisy, auxfree gates), and train.py continues it."""
import json

import pytest
import torch

import convert_checkpoint as cc
import eval as evaluation
import train
from conftest import MOE, TINY, convert_with_memory_limit, write_corpus
from utils import checkpoint as ckpt
from utils import files


@pytest.fixture(scope='module')
def dense_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('upcycle')
    corpus = write_corpus(root / 'enwik8', sizes=(8000, 2000, 2000))
    run = root / 'dense'
    assert train.main(['--data', str(corpus), '--work_dir', str(run), *TINY, '--max_step', '4']) == 0
    return run, corpus


def valid_loss(work_dir, corpus):
    assert evaluation.main(['--work_dir', str(work_dir), '--data', str(corpus), '--split', 'valid',
                            '--tgt_len', '16', '--mem_len', '16']) == 0
    return json.loads((work_dir / 'eval.json').read_text())['valid']['loss']


def upcycle(dense, work_dir, *flags):
    return cc.main(['--upcycle', str(dense), '--moe-num-expert', '4', '--work_dir', str(work_dir), *flags])


@pytest.mark.parametrize('gate', ['naive', 'noisy', 'auxfree'])
def test_upcycled_model_evaluates_to_the_dense_loss(dense_run, tmp_path, gate):
    dense, corpus = dense_run
    new = tmp_path / 'moe'
    assert upcycle(dense, new, '--moe-top-k', '2', '--moe-gate', gate) == 0
    saved = ckpt.load(new / 'model.pt', 'model')
    assert saved['config']['moe'] and saved['config']['moe_gate'] == gate
    dense_state = ckpt.load(dense / 'model.pt', 'model')['model_state']
    experts = saved['model_state']['layers.1.pos_ff.experts.htoh4.weight']
    assert experts.shape == (4, 64, 32)
    assert all(torch.equal(e, dense_state['layers.1.pos_ff.CoreNet.0.weight']) for e in experts)
    assert valid_loss(new, corpus) == pytest.approx(valid_loss(dense, corpus), rel=1e-6)


def test_an_original_state_dict_upcycles_through_the_import(dense_run, tmp_path):
    """A plain state dict as the original saved it goes through convert_checkpoint's import first."""
    dense, corpus = dense_run
    original = tmp_path / 'original.pt'
    torch.save(ckpt.load(dense / 'model.pt', 'model')['model_state'], original)
    new = tmp_path / 'moe'
    assert upcycle(original, new, '--moe-top-k', '1', '--dataset', 'enwik8', '--data', str(corpus),
                   '--n_head', '2', '--mem_len', '16', '--tgt_len', '16') == 0
    assert valid_loss(new, corpus) == pytest.approx(valid_loss(dense, corpus), rel=1e-6)


def test_switch_gate_scales_its_expert_so_the_loss_differs(dense_run, tmp_path, capsys):
    dense, corpus = dense_run
    assert upcycle(dense, tmp_path / 'switch', '--moe-top-k', '1', '--moe-gate', 'switch') == 0
    assert 'does not start equal' in capsys.readouterr().out
    assert valid_loss(tmp_path / 'switch', corpus) != pytest.approx(valid_loss(dense, corpus), rel=1e-3)


def test_noise_breaks_the_symmetry_and_training_continues(dense_run, tmp_path, capsys):
    dense, corpus = dense_run
    new = tmp_path / 'moe'
    assert upcycle(dense, new, '--moe-top-k', '2', '--upcycle-noise', '0.01') == 0
    experts = ckpt.load(new / 'model.pt', 'model')['model_state']['layers.0.pos_ff.experts.h4toh.weight']
    assert not torch.equal(experts[0], experts[1])
    assert valid_loss(new, corpus) == pytest.approx(valid_loss(dense, corpus), rel=1e-2)
    run = tmp_path / 'continued'
    assert train.main(['--data', str(corpus), '--work_dir', str(run), *TINY, *MOE, '--restart_dir', str(new),
                       '--max_step', '2']) == 0
    assert 'Starting from the weights of' in (run / 'log.txt').read_text()


@pytest.mark.parametrize('flags,message', [
    ([], '--upcycle needs --moe-num-expert E and --moe-top-k K'),
    (['--moe-top-k', '5'], 'top_k'),
    (['--moe-top-k', '2', '--upcycle-noise', '-1'], '--upcycle-noise -1.0 must be a finite number >= 0'),
])
def test_bad_upcycling_input_exits_2_and_writes_nothing(dense_run, tmp_path, capsys, flags, message):
    dense, _ = dense_run
    assert upcycle(dense, tmp_path / 'out', *flags) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and message in err and not (tmp_path / 'out').exists()


def test_upcycling_an_moe_model_is_refused(dense_run, tmp_path, capsys):
    dense, _ = dense_run
    assert upcycle(dense, tmp_path / 'moe', '--moe-top-k', '2') == 0
    assert upcycle(tmp_path / 'moe', tmp_path / 'again', '--moe-top-k', '2') == 2
    assert 'already a Mixture of Experts' in capsys.readouterr().err


def test_a_training_run_is_never_upcycled_into(dense_run, tmp_path, capsys):
    """--upcycle DENSE --work_dir RUN --overwrite replaced the model.pt of a run train.py was training (or had
    finished: train.py --restart then died on it): a locked directory or one with a checkpoint.pt is refused."""
    dense, corpus = dense_run
    live = tmp_path / 'live'
    assert train.main(['--data', str(corpus), '--work_dir', str(live), *TINY, '--max_step', '2']) == 0
    before = {p.name: p.read_bytes() for p in live.iterdir() if p.is_file()}
    lock = files.lock_directory(str(live), '--work_dir')  # train.py, running there
    assert upcycle(dense, live, '--moe-top-k', '2', '--overwrite') == 2
    assert 'is in use by another process' in capsys.readouterr().err
    lock.release()
    assert upcycle(dense, live, '--moe-top-k', '2', '--overwrite') == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'holds a training run (checkpoint.pt)' in err
    assert {p.name: p.read_bytes() for p in live.iterdir() if p.is_file()} == before


def test_an_upcycled_model_is_finite_and_fits_in_memory(dense_run, tmp_path, capsys):
    """--upcycle-noise inf wrote inf weights, 1e300 overflows to inf, --seed 2**70 was an overflow traceback,
    ten million experts ran the machine out of memory."""
    dense, _ = dense_run
    for flags, message in [(['--upcycle-noise', 'inf'], '--upcycle-noise inf must be a finite number >= 0'),
                           (['--upcycle-noise', 'nan'], '--upcycle-noise nan must be a finite number >= 0'),
                           (['--upcycle-noise', '1e300'], 'holds NaN or infinite values, with which a model computes '
                                                          'nothing: pass a smaller --upcycle-noise'),
                           (['--seed', str(2 ** 70)], f'--seed {2 ** 70} must be between 0 and 2**64 - 1'),
                           (['--seed', '-1'], '--seed -1 must be between 0 and 2**64 - 1')]:
        assert upcycle(dense, tmp_path / 'out', '--moe-top-k', '2', *flags) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and message in err and not (tmp_path / 'out').exists(), err
    codes, errors = convert_with_memory_limit([['--upcycle', dense, '--moe-num-expert', 10 ** 7, '--moe-top-k', 2,
                                                '--work_dir', tmp_path / 'out']])
    assert codes == [2] and len(errors) == 1 and '--moe-num-expert 10000000 needs' in errors[0], errors
    assert not (tmp_path / 'out').exists()
