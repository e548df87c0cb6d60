"""eval.py against a token-level reference computed here, its output formats and its bad-input cases."""
import errno
import json
import math
import os
import re

import pytest
import torch

import data_utils
import eval as evaluation
import mem_transformer
import train
from conftest import MOE, TINY, write_corpus
from utils import checkpoint as ckpt
from utils import files
from run.evaluation import evaluate
from run.model_file import load_model
from utils.exp_utils import format_loss


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny MoE model trained for a few steps, and its corpus."""
    root = tmp_path_factory.mktemp('eval')
    corpus = write_corpus(root / 'enwik8', sizes=(20000, 3000, 2500))
    work = root / 'run'
    assert train.main(['--data', str(corpus), '--work_dir', str(work), *TINY, *MOE, '--max_step', '20']) == 0
    return work, corpus


def eval_main(work, *flags):
    try:
        return evaluation.main(['--work_dir', str(work), *flags])
    except SystemExit as e:
        return e.code


def reference_loss(work, corpus, split, batch_size, tgt_len, mem_len, clamp_len=-1, same_length=False):
    """Mean per-token NLL over the split, read in bsz parallel streams of consecutive tgt_len segments,
    each segment attending to the memory of the previous ones: the token-level definition of the metric."""
    model, _ = load_model(work / 'model.pt')
    model.eval()
    model.reset_length(tgt_len, 0, mem_len)
    if clamp_len > 0:
        model.clamp_len = clamp_len
    model.same_length = model.same_length or same_length
    vocab = data_utils.get_lm_corpus(str(corpus), 'enwik8').vocab  # only the symbol -> id mapping
    ids = torch.tensor([vocab.get_idx(tok) for tok in (corpus / f'{split}.txt').read_text().split()])
    n_rows = len(ids) // batch_size
    streams = ids[:n_rows * batch_size].view(batch_size, n_rows).t()
    token_losses, mems = [], []
    with torch.no_grad():
        for start in range(0, n_rows - 1, tgt_len):
            end = min(start + tgt_len, n_rows - 1)
            ret = model(streams[start:end], streams[start + 1:end + 1], *mems)
            token_losses.append(ret[0].reshape(-1))
            mems = ret[1:]
    return torch.cat(token_losses).double().mean().item()


@pytest.mark.parametrize('settings', [
    dict(batch_size=10, tgt_len=5, mem_len=0),
    dict(batch_size=3, tgt_len=16, mem_len=24, clamp_len=10, same_length=True),
])
def test_loss_equals_the_token_level_reference(trained, settings, capsys):
    work, corpus = trained
    flags = ['--split', 'test'] + [f'--{k}' if v is True else f'--{k} {v}' for k, v in settings.items()]
    assert eval_main(work, *' '.join(flags).split()) == 0
    result = json.loads((work / 'eval.json').read_text())
    assert result['test']['loss'] == pytest.approx(reference_loss(work, corpus, 'test', **settings), rel=1e-6)
    assert result['test']['bpc'] == pytest.approx(result['test']['loss'] / math.log(2))
    assert 'valid' not in result and result['settings']['tgt_len'] == settings['tgt_len']
    out = capsys.readouterr().out
    assert re.search(r'^\| test loss +[\d.]+ \| test bpc +[\d.]+$', out, re.M)
    assert f"Evaluating with bsz {settings['batch_size']} tgt_len {settings['tgt_len']}" in out


def test_validation_during_training_with_shorter_segments(tmp_path, trained):
    """train.py validates on --eval_tgt_len segments (8 here, training's 16), the lost context moved to the
    memory (16 + 16 - 8 = 24), as every run script does: the logged figure is the token-level reference."""
    _, corpus = trained
    work = tmp_path / 'run'
    assert train.main(['--data', str(corpus), '--work_dir', str(work), *TINY, '--eval_tgt_len', '8',
                       '--max_step', '10', '--max_eval_steps', '-1']) == 0
    logged = [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]
    valid = [r['loss'] for r in logged if r['split'] == 'valid']
    assert len(valid) == 1  # one validation, at step 10: model.pt holds the weights it saw
    assert valid[0] == pytest.approx(reference_loss(work, corpus, 'valid', 10, 8, mem_len=24), rel=1e-6)


def test_segments_reuse_the_keys_and_values_of_their_memory(trained, monkeypatch):
    work, corpus = trained
    model, _ = evaluation.load_model(str(work), 'cpu')
    model.reset_length(16, 0, 24)
    split = data_utils.get_lm_corpus(str(corpus), 'enwik8').get_iterator('test', 3, 16)
    rows_projected = []
    model.layers[0].dec_attn.qkv_net.register_forward_hook(
        lambda module, args, out: rows_projected.append(args[0].shape[0]))
    cached, n_segments = evaluate(model, split)
    # the segment's rows only, never memory + segment (the first segment has no memory)
    assert len(rows_projected) == n_segments > 3 and max(rows_projected) <= 16
    assert evaluate(model, split, kv_cache=False)[0] == pytest.approx(cached, rel=1e-6)
    assert model.layers[0].dec_attn.kv_cache is None


def test_memory_and_both_splits(trained, capsys):
    work, _ = trained
    assert eval_main(work, '--tgt_len', '8') == 0  # --split all; data and dataset come from the checkpoint
    without = json.loads((work / 'eval.json').read_text())
    assert eval_main(work, '--tgt_len', '8', '--mem_len', '32') == 0
    with_memory = json.loads((work / 'eval.json').read_text())
    assert set(without) >= {'valid', 'test'}
    assert with_memory['test']['loss'] != without['test']['loss']
    out = capsys.readouterr().out
    assert re.search(r'^\| valid loss +[\d.]+ \| valid bpc +[\d.]+ \| test loss +[\d.]+ \| test bpc +[\d.]+$',
                     out, re.M)
    log = (work / 'log.txt').read_text()
    assert 'Evaluating with bsz 10 tgt_len 8 ext_len 0 mem_len 32 clamp_len -1' in log
    assert re.search(r'Time : [\d.]+s, [\d.]+ms/segment', log)


def test_no_log_writes_nothing(trained):
    work, _ = trained
    before = {name: (work / name).read_bytes() for name in os.listdir(work)}
    assert eval_main(work, '--split', 'valid', '--no_log') == 0
    assert {name: (work / name).read_bytes() for name in os.listdir(work)} == before


def test_a_read_only_run_directory_needs_no_log(trained, capsys, monkeypatch):
    """Evaluating a run on a read-only mount gave a traceback after the whole evaluation."""
    work, _ = trained

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, 'Read-only file system')
    monkeypatch.setattr(files.tempfile, 'mkstemp', read_only)
    expect_error(capsys, work, 'is not writable (Read-only file system', '--split', 'valid')
    assert eval_main(work, '--split', 'valid', '--no_log') == 0


def test_word_level_datasets_report_perplexity():
    assert format_loss('wt103', 'test', 3.0) == f'| test loss  3.00 | test ppl {math.exp(3):9.3f}'
    assert format_loss('text8', 'valid', 1.0) == f'| valid loss  1.00 | valid bpc {1 / math.log(2):9.5f}'


def expect_error(capsys, work, message, *flags):
    before = {name: (work / name).read_bytes() for name in os.listdir(work)} if work.is_dir() else None
    assert eval_main(work, *flags) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('eval.py: error: ') and message in err, err
    if before is not None:
        assert {name: (work / name).read_bytes() for name in os.listdir(work)} == before


def test_bad_input(trained, tmp_path, capsys):
    work, corpus = trained
    expect_error(capsys, tmp_path / 'nowhere', 'nowhere does not exist')
    (tmp_path / 'a-file').write_text('x')
    expect_error(capsys, tmp_path / 'a-file', 'a-file is a file: give the run directory')
    expect_error(capsys, work, '--tgt_len 0 must be at least 1', '--tgt_len', '0')
    expect_error(capsys, work, 'needs --mem_len > 0', '--same_length', '--mem_len', '0')
    expect_error(capsys, work, 'data directory', '--data', str(tmp_path / 'missing'))
    expect_error(capsys, work, "invalid choice: 'enwik9'", '--dataset', 'enwik9')
    other = write_corpus(tmp_path / 'digits', sizes=(3000, 1000, 1000), seed=1)
    (other / 'test.txt').write_text('48 49 50 51 52 53 54 55 56 57 ' * 50)  # more symbols than the model knows
    expect_error(capsys, work, 'tokens but the model in', '--data', str(other))
    # too small a split for the batch: refused before log.txt is touched (expect_error compares the files)
    expect_error(capsys, work, 'the test split has 2427 tokens, too few for a batch of 2000: it needs at least 4000',
                 '--batch_size', '2000')

    broken = tmp_path / 'broken'
    broken.mkdir()
    expect_error(capsys, broken, 'model.pt does not exist')
    (broken / 'model.pt').write_bytes((work / 'model.pt').read_bytes()[:500])
    expect_error(capsys, broken, 'model.pt is unreadable')
    saved = ckpt.load(work / 'model.pt', 'model')
    saved['config']['n_layer'] = 3
    ckpt.atomic_save(saved, broken / 'model.pt')
    expect_error(capsys, broken, 'do not fit the model: Missing key(s)')
    saved['config']['moe_top_k'] = 9
    ckpt.atomic_save(saved, broken / 'model.pt')
    expect_error(capsys, broken, 'holds a model configuration this code rejects: moe_top_k=9')


def test_without_length_flags_the_run_s_own_lengths(trained, tmp_path):
    """No length flag: the run's own evaluation lengths (its --eval_tgt_len 8 of 16, the lost 8 moved to the
    memory: 16 + 8 = 24), the loss the same as with those lengths given; a flag given wins over its default."""
    _, corpus = trained
    work = tmp_path / 'run'
    assert train.main(['--data', str(corpus), '--work_dir', str(work), *TINY, '--eval_tgt_len', '8',
                       '--clamp_len', '12', '--max_step', '2']) == 0
    assert eval_main(work, '--split', 'test') == 0
    own = json.loads((work / 'eval.json').read_text())
    assert {k: own['settings'][k] for k in ('tgt_len', 'ext_len', 'mem_len', 'clamp_len', 'same_length')} == \
        dict(tgt_len=8, ext_len=0, mem_len=24, clamp_len=12, same_length=False)
    assert own['test']['loss'] == pytest.approx(reference_loss(work, corpus, 'test', 10, 8, 24, clamp_len=12),
                                                rel=1e-6)
    assert eval_main(work, '--split', 'test', '--tgt_len', '8', '--mem_len', '24') == 0
    assert json.loads((work / 'eval.json').read_text())['test']['loss'] == own['test']['loss']
    assert eval_main(work, '--split', 'test', '--mem_len', '4', '--clamp_len', '-1') == 0
    given = json.loads((work / 'eval.json').read_text())['settings']
    assert (given['tgt_len'], given['mem_len'], given['clamp_len']) == (8, 4, -1)


def test_a_model_without_its_run_s_flags_is_evaluated_with_its_training_lengths(trained, tmp_path):
    work, corpus = trained
    converted = tmp_path / 'converted'
    converted.mkdir()
    saved = ckpt.load(work / 'model.pt', 'model')
    del saved['args']
    ckpt.atomic_save(saved, converted / 'model.pt')
    assert eval_main(converted, '--split', 'test', '--data', str(corpus), '--dataset', 'enwik8') == 0
    settings = json.loads((converted / 'eval.json').read_text())['settings']
    assert (settings['tgt_len'], settings['ext_len'], settings['mem_len']) == (16, 0, 16)  # TINY's


def test_help_says_what_the_lengths_default_to(capsys):
    with pytest.raises(SystemExit):
        evaluation.build_parser().parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert "number of tokens to predict (default: the run's own, see below)" in text
    assert "max positional embedding index (default: the model's own; -1 for none)" in text
    assert "Lengths not given are the run's own" in text


def test_a_long_evaluation_says_how_far_it_is(trained, monkeypatch, capsys):
    """Off a terminal (pytest's captured output), a line every PROGRESS_LINE_S seconds: here 0, every segment."""
    work, _ = trained
    monkeypatch.setattr(evaluation, 'PROGRESS_LINE_S', 0)
    assert eval_main(work, '--split', 'test', '--no_log') == 0
    lines = re.findall(r'^\| test segment (\d+)/(\d+) \| \d+s \| about \d+s left$', capsys.readouterr().out, re.M)
    assert [int(n) for n, _ in lines] == list(range(1, len(lines) + 1)) and lines[-1][0] == lines[-1][1]
