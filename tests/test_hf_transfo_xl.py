"""Hugging Face Transformer-XL import (utils/hf_transfo_xl.py, convert_checkpoint.py HF_DIR).

Against the real implementation: small random TransfoXLLMHeadModels built and saved by transformers 4.35.2
(an optional test dependency, requirements-test.txt; these tests skip without it) are converted, and the
converted model's per-token losses over segments carrying memory, and its generation's next-token
distributions, are compared with Hugging Face's own forward. Without transformers, directories in the same
layout, written here from this repository's models, test the reading, the vocabulary and the run directory
(eval.py, generate.py, fine-tuning with --restart_dir on a corpus with the model's own vocabulary)."""
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import warnings
from collections import Counter, OrderedDict

import pytest
import torch

import convert_checkpoint as cc
import eval as evaluation
import generate
import train
from mem_transformer import MemTransformerLM, init_weights
from utils import checkpoint as ckpt
from conftest import ROOT, convert_with_memory_limit
from utils import hf_transfo_xl as hf_xl
from run.generation import Decoder
from run.model_file import load_model

SEGMENTS, TGT_LEN, BSZ = 3, 6, 2


def transformers_model_classes():
    """TransfoXLConfig and TransfoXLLMHeadModel of transformers 4.35.x, or skip (they left in 5.0, and
    4.40's forward fails on torch 2.13)."""
    transformers = pytest.importorskip('transformers', reason='transformers==4.35.2 (requirements-test.txt) '
                                                              'is not installed')
    if tuple(int(p) for p in transformers.__version__.split('.')[:2]) != (4, 35):
        pytest.skip(f'transformers {transformers.__version__}: these tests need 4.35.x (requirements-test.txt), '
                    'the last whose Transformer-XL runs on this torch')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            from transformers import TransfoXLConfig, TransfoXLLMHeadModel
        except ImportError:
            pytest.skip(f'transformers {transformers.__version__} has no Transformer-XL (4.35.2 has)')
    return TransfoXLConfig, TransfoXLLMHeadModel


HF_CONFIGS = {  # name: (TransfoXLConfig arguments, save_pretrained's safe_serialization)
    'untied-r-div1': (dict(untie_r=True, div_val=1, cutoffs=[], d_embed=32), True),
    'tied-r-div4-same-length-clamp': (dict(untie_r=False, div_val=4, cutoffs=[12, 40], d_embed=32,
                                           proj_share_all_but_first=True, same_length=True, clamp_len=5), True),
    'untied-r-div4-untied-projs-bin': (dict(untie_r=True, div_val=4, cutoffs=[12, 40], d_embed=64,
                                            proj_share_all_but_first=False, same_length=True, clamp_len=7), False),
    'div1-projected-untied-output-pre-lnorm': (dict(untie_r=True, div_val=1, cutoffs=[20], d_embed=16,
                                                    proj_share_all_but_first=True, tie_word_embeddings=False,
                                                    pre_lnorm=True), True),
    'tied-r-div1-bin': (dict(untie_r=False, div_val=1, cutoffs=[30], d_embed=32, clamp_len=3), False),
}
N_TOKEN = 60


def write_hf_model(directory, kw, safe, seed=0):
    """A random TransfoXLLMHeadModel, saved by transformers, with a plain-text vocabulary; returns the model."""
    TransfoXLConfig, TransfoXLLMHeadModel = transformers_model_classes()
    settings = dict(vocab_size=N_TOKEN, d_model=32, n_head=2, d_head=16, d_inner=48, n_layer=3, mem_len=8,
                    same_length=False, clamp_len=-1, dropout=0.0, dropatt=0.0)
    settings.update(kw)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = TransfoXLLMHeadModel(TransfoXLConfig(**settings))
    with torch.no_grad():  # weights far from the initialisation's, so that every one shows in the losses
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.save_pretrained(directory, safe_serialization=safe)
    write_vocab_txt(directory, N_TOKEN)
    return model.eval()


def symbols(n):
    return [f'w{i}' for i in range(n - 2)] + ['<unk>', '<eos>']


def write_vocab_txt(directory, n):
    with open(os.path.join(directory, 'vocab.txt'), 'w', encoding='utf-8') as f:
        f.write(''.join(f'{s} {n - i}\n' for i, s in enumerate(symbols(n))))  # "symbol count", as the tokenizer


def hf_segment_losses(hf_model, data):
    """Per-token losses [len, bsz] of consecutive segments, each attending to the previous ones' memory, by
    Hugging Face's forward (its log-probabilities; its memory starts empty here, as this model's does)."""
    n_layer, d_model = hf_model.config.n_layer, hf_model.config.d_model
    mems = [torch.zeros(0, data.size(1), d_model) for _ in range(n_layer)]
    losses = []
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, TGT_LEN):
            inp, tgt = data[i:i + TGT_LEN], data[i + 1:i + 1 + TGT_LEN]
            out = hf_model(input_ids=inp.t(), mems=mems)
            mems = out.mems
            log_probs = out.prediction_scores.transpose(0, 1)  # [len, bsz, n_token]
            losses.append(-log_probs.gather(-1, tgt[..., None]).squeeze(-1))
    return torch.cat(losses)


def our_segment_losses(model, data):
    mems, losses = (), []
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, TGT_LEN):
            end = min(i + TGT_LEN, data.size(0) - 1)
            out = model(data[i:end], data[i + 1:end + 1], *mems)
            losses.append(out[0])
            mems = out[1:]
    return torch.cat(losses)


def convert(hf_dir, work, *flags):
    assert cc.main([str(hf_dir), '--work_dir', str(work), *flags]) == 0
    model, saved = load_model(str(work))
    return model, saved


MAX_DIFF = {}


@pytest.mark.parametrize('name', sorted(HF_CONFIGS))
def test_losses_and_generation_equal_hugging_faces(name, tmp_path, capsys):
    kw, safe = HF_CONFIGS[name]
    hf_model = write_hf_model(tmp_path / 'hf', kw, safe)
    weights = 'model.safetensors' if safe else 'pytorch_model.bin'
    assert (tmp_path / 'hf' / weights).exists()
    model, saved = convert(tmp_path / 'hf', tmp_path / 'run')
    assert f'Hugging Face TransfoXLLMHeadModel ({weights}, vocab.txt)' in capsys.readouterr().out
    assert saved['vocab'] == symbols(N_TOKEN)
    assert model.untie_r == kw['untie_r'] and model.same_length == kw.get('same_length', False)
    data = torch.randint(0, N_TOKEN, (SEGMENTS * TGT_LEN + 1, BSZ), generator=torch.Generator().manual_seed(1))
    ours, theirs = our_segment_losses(model, data), hf_segment_losses(hf_model, data)
    MAX_DIFF[name] = (ours - theirs).abs().max().item()
    print(f'{name}: largest per-token loss difference {MAX_DIFF[name]:.2e} (losses ~{theirs.mean():.1f})')
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    # Generation: a prompt fed in chunks, then one token at a time, against Hugging Face fed the same way.
    decoder = Decoder(model, chunk_len=4)
    ours = [decoder.feed(data[:10])] + [decoder.feed(data[t:t + 1]) for t in range(10, 16)]
    mems, theirs = [torch.zeros(0, BSZ, hf_model.config.d_model) for _ in range(hf_model.config.n_layer)], []
    with torch.no_grad():
        for piece in list(data[:10].split(4)) + list(data[10:16].split(1)):
            out = hf_model(input_ids=piece.t(), mems=mems)
            mems = out.mems
            theirs.append(out.prediction_scores[:, -1])
    torch.testing.assert_close(torch.stack(ours), torch.stack(theirs[2:]), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- without transformers

def hf_keys(model):
    """This repository's state dict under Hugging Face's names (save_pretrained's .bin layout), the tail
    clusters' head rows in Hugging Face's order (cluster i at cutoffs[0] + i - 1, not the original's -i)."""
    state = {(k if k.startswith('crit.') else 'transformer.' + k): v for k, v in model.state_dict().items()}
    for key in ('crit.cluster_weight', 'crit.cluster_bias'):
        state[key] = state[key].flip(0)
    return state


def our_model(seed=0, **kw):
    torch.manual_seed(seed)
    config = dict(n_token=N_TOKEN, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=24, dropout=0.0,
                  dropatt=0.0, tgt_len=6, ext_len=0, mem_len=8, untie_r=True, d_embed=16, div_val=2,
                  cutoffs=[12, 40], tie_projs=[False, True, True], same_length=True, clamp_len=5)
    config.update(kw)
    return init_weights(MemTransformerLM(**config), init_std=0.3, proj_init_std=0.3).eval()


def hf_config_json(model):
    c = model.config
    return dict(model_type='transfo-xl', architectures=['TransfoXLLMHeadModel'], vocab_size=c['n_token'],
                n_layer=c['n_layer'], n_head=c['n_head'], d_model=c['d_model'], d_head=c['d_head'],
                d_inner=c['d_inner'], d_embed=c['d_embed'], div_val=c['div_val'], cutoffs=c['cutoffs'],
                tie_projs=c['tie_projs'], untie_r=c['untie_r'], same_length=c['same_length'],
                clamp_len=c['clamp_len'], mem_len=c['mem_len'], dropout=0.1, dropatt=0.0, pre_lnorm=False,
                attn_type=0, sample_softmax=-1, layer_norm_epsilon=1e-5)


def write_safetensors(state, path):
    """The format by hand (8-byte little-endian header size, JSON header, raw tensors), for the reader's test."""
    names = {torch.float32: 'F32', torch.int64: 'I64', torch.bfloat16: 'BF16'}
    header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
    for key, value in state.items():
        raw = value.contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b''
        header[key] = {'dtype': names[value.dtype], 'shape': list(value.shape),
                       'data_offsets': [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(blob)) + blob + b''.join(blobs))


def write_hf_dir(directory, model, vocab=None, safetensors=True):
    """A Hugging Face directory holding `model`: config.json, weights (safetensors without the tied output
    tensors, as save_pretrained writes them), vocab.txt."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'config.json'), 'w') as f:
        json.dump(hf_config_json(model), f)
    state = hf_keys(model)
    if safetensors:
        tied = {k for k in state if k.startswith('crit.out_layers.') and k.endswith('.weight')}
        tied |= {f'crit.out_projs.{i}' for i, t in enumerate(model.config['tie_projs']) if t}
        write_safetensors({k: v for k, v in state.items() if k not in tied}, os.path.join(directory,
                                                                                         'model.safetensors'))
    else:
        torch.save(state, os.path.join(directory, 'pytorch_model.bin'))
    if vocab is not None:
        with open(os.path.join(directory, 'vocab.txt'), 'w', encoding='utf-8') as f:
            f.write(''.join(s + '\n' for s in vocab))
    return directory


def test_safetensors_reader_against_the_format():
    tensors = {'a': torch.randn(3, 4), 'b': torch.arange(5), 'c': torch.randn(2, 2).bfloat16(), 'd': torch.zeros(0, 3)}
    path = '/dev/null'
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'x.safetensors')
        write_safetensors(tensors, path)
        got = hf_xl.read_safetensors(path)
        assert got.keys() == tensors.keys()
        assert all(torch.equal(got[k], tensors[k]) and got[k].dtype == tensors[k].dtype for k in tensors)
        try:
            from safetensors.torch import load_file
        except ImportError:
            load_file = None
        if load_file is not None:  # the reference implementation reads the same file the same way
            ref = load_file(path)
            assert all(torch.equal(got[k], ref[k]) for k in tensors)
        with open(path, 'r+b') as f:
            f.seek(8)
            f.write(b'[')
        with pytest.raises(hf_xl.HFImportError, match='is not a safetensors file'):
            hf_xl.read_safetensors(path)


@pytest.mark.parametrize('safetensors', [True, False], ids=['safetensors', 'bin'])
def test_directory_round_trip(tmp_path, safetensors):
    model = our_model()
    write_hf_dir(tmp_path / 'hf', model, symbols(N_TOKEN), safetensors)
    converted, saved = convert(tmp_path / 'hf', tmp_path / 'run')
    assert converted.config == {**model.config, 'dropout': 0.1, 'tgt_len': 128}  # (no tgt_len in config.json)
    assert saved['vocab'] == symbols(N_TOKEN)
    ours, theirs = converted.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def real_vocab_pickle(path, idx2sym, extra=()):
    """vocab.pkl as the Hugging Face tokenizer pickles its __dict__: plain containers (and objects)."""
    state = {'special': ['<eos>'], 'min_freq': 0, 'max_size': None, 'lower_case': False, 'delimiter': None,
             'vocab_file': None, 'never_split': ['<unk>', '<eos>'], 'counter': Counter({s: 3 for s in idx2sym}),
             'idx2sym': list(idx2sym), 'sym2idx': OrderedDict((s, i) for i, s in enumerate(idx2sym)),
             'unk_idx': idx2sym.index('<unk>'), **dict(extra)}
    with open(path, 'wb') as f:
        pickle.dump(state, f, protocol=2)


class Marker:  # an object the tokenizer pickled (regular expressions, Moses objects): must not be built
    built = False

    def __reduce__(self):
        return (os.system, ('touch SHOULD-NOT-EXIST',))


def test_vocab_pickle_needs_trust_and_runs_no_code(tmp_path, capsys, monkeypatch):
    model = our_model()
    hf = write_hf_dir(tmp_path / 'hf', model)
    vocab = symbols(N_TOKEN)[::-1]
    real_vocab_pickle(hf / 'vocab.pkl', vocab, [('pattern', Marker())])
    assert cc.main([str(hf), '--work_dir', str(tmp_path / 'run')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'vocab.pkl is a pickle' in err and '--trust-pickle' in err
    assert not (tmp_path / 'run').exists()
    monkeypatch.chdir(tmp_path)
    _, saved = convert(hf, tmp_path / 'run', '--trust-pickle')
    assert saved['vocab'] == vocab
    assert not (tmp_path / 'SHOULD-NOT-EXIST').exists()


def test_bad_directories_exit_2_with_one_line(tmp_path, capsys):
    model = our_model()

    def error(hf, *flags):
        assert cc.main([str(hf), '--work_dir', str(tmp_path / 'run'), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and not (tmp_path / 'run').exists(), err
        return err

    hf = write_hf_dir(tmp_path / 'novocab', model)
    assert 'has no vocab.txt or vocab.pkl' in error(hf)
    hf = write_hf_dir(tmp_path / 'shortvocab', model, symbols(N_TOKEN)[:-1])
    assert 'has 59 symbols (59 different) but the model has 60 tokens' in error(hf)
    hf = write_hf_dir(tmp_path / 'noweights', model, symbols(N_TOKEN))
    os.remove(hf / 'model.safetensors')
    assert 'has no weights' in error(hf)
    hf = write_hf_dir(tmp_path / 'attn1', model, symbols(N_TOKEN))
    config = json.loads((hf / 'config.json').read_text())
    (hf / 'config.json').write_text(json.dumps({**config, 'attn_type': 1}))
    assert "attn_type 1; Hugging Face's Transformer-XL has only type 0" in error(hf)
    (hf / 'config.json').write_text(json.dumps({**config, 'model_type': 'gpt2'}))
    assert "is a 'gpt2' model" in error(hf)
    (hf / 'config.json').write_text(json.dumps({**config, 'd_inner': 30}))
    assert 'pos_ff.CoreNet.0.weight' in error(hf)
    (hf / 'config.json').write_text(json.dumps(config))
    assert '--n_head is read from' in error(hf, '--n_head', '4')


# ----------------------------------------------------------------------------- the run directory

WORDS = [f'w{i}' for i in range(N_TOKEN - 2)]


def write_wt103(directory, seed=0):
    """WikiText-format splits over WORDS whose frequencies differ from the model's symbol order, so a
    vocabulary counted from them would give other ids."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    weights = [1 + (i * 7) % 13 for i in range(len(WORDS))]
    for split, n_lines in (('train', 300), ('valid', 40), ('test', 40)):
        lines = [' '.join(rng.choices(WORDS, weights, k=rng.randint(5, 15))) for _ in range(n_lines)]
        (directory / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    return directory


def test_evaluate_generate_and_fine_tune_with_the_models_own_vocabulary(tmp_path, capsys):
    import data_utils
    data = write_wt103(tmp_path / 'wikitext-103')
    model = our_model()
    hf = write_hf_dir(tmp_path / 'hf', model, symbols(N_TOKEN))
    run = tmp_path / 'run'
    convert(hf, run, '--dataset', 'wt103', '--data', str(data))
    counted = data_utils.get_lm_corpus(str(data), 'wt103').vocab.idx2sym
    assert counted != symbols(N_TOKEN)  # the counted vocabulary would give other ids
    corpus = data_utils.get_lm_corpus(str(data), 'wt103', symbols(N_TOKEN))
    assert corpus.vocab.idx2sym == symbols(N_TOKEN)
    first = (data / 'test.txt').read_text().split()[:3]
    assert corpus.test[:3].tolist() == [symbols(N_TOKEN).index(w) for w in first]

    capsys.readouterr()
    assert evaluation.main(['--work_dir', str(run), '--split', 'test', '--batch_size', '2', '--tgt_len', '6',
                            '--mem_len', '8']) == 0
    result = json.loads((run / 'eval.json').read_text())['test']
    ids = corpus.test.long()
    n_rows = len(ids) // 2
    streams = ids[:2 * n_rows].view(2, n_rows).t()
    reference = our_segment_losses(model, streams).double().mean().item()
    assert result['loss'] == pytest.approx(reference, rel=1e-5)

    capsys.readouterr()
    assert generate.main(['--work_dir', str(run), '--prompt', 'w1 w2', '--max_tokens', '5', '--seed', '0']) == 0
    text = capsys.readouterr().out.splitlines()[-1].split()
    assert text[:2] == ['w1', 'w2'] and len(text) == 7 and set(text) <= set(WORDS)

    tuned = tmp_path / 'tuned'
    flags = ['--data', str(data), '--dataset', 'wt103', '--n_layer', '2', '--n_head', '2', '--d_head', '8',
             '--d_model', '16', '--d_inner', '24', '--d_embed', '16', '--div_val', '2', '--untie_r',
             '--tgt_len', '6', '--mem_len', '8', '--eval_tgt_len', '6', '--batch_size', '4', '--max_step', '4',
             '--eval-interval', '4', '--log-interval', '1', '--same_length', '--clamp_len', '5', '--max_eval_steps', '3']
    with pytest.MonkeyPatch.context() as mp:  # the model's own cutoffs and projection tying for this tiny corpus
        mp.setitem(data_utils.ADAPTIVE_CUTOFFS, 'wt103', ([12, 40], True))
        assert train.main([*flags, '--adaptive', '--work_dir', str(tuned), '--restart_dir', str(run)]) == 0
    saved = ckpt.load(tuned / 'model.pt', 'model')
    assert saved['vocab'] == symbols(N_TOKEN)
    assert ckpt.load(tuned / 'checkpoint.pt')['vocab'] == symbols(N_TOKEN)


# ----------------------------------------------------------------------------- hostile files

def write_raw_safetensors(path, header, data=b''):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(blob)) + blob + data)
    return path


def entry(dtype, shape, begin, end):
    return {'dtype': dtype, 'shape': shape, 'data_offsets': [begin, end]}


@pytest.mark.parametrize('header,data,reason', [
    ([1, 2], b'', 'is a JSON list'),
    ('x', b'', 'is a JSON str'),
    (3, b'', 'is a JSON int'),
    (None, b'', 'is a JSON NoneType'),
    (b'[' * 100_000 + b']' * 100_000, b'', 'RecursionError'),
    ({'a': entry('F32', [-1, -2], 0, 8)}, bytes(8), 'not a list of integers >= 0'),
    ({'a': entry('F32', [2.5, 1], 0, 8)}, bytes(8), 'not a list of integers >= 0'),  # was truncated to [2, 1]
    ({'a': entry('F32', [2], 0, 8), 'b': entry('F32', [2], 0, 8)}, bytes(8), 'not at 8'),  # one copy, two names
    ({'a': entry('F32', [2], 0, 8)}, bytes(12), '8 bytes but 12 follow'),
    ({'a': entry('F32', [2], 0, 8)}, bytes(4), '8 bytes but 4 follow'),
    ({'a': entry('Q8', [2], 0, 2)}, bytes(2), 'no known dtype'),
    ({'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, '4']}}, bytes(4), 'not two integers'),
])
def test_a_file_that_is_not_safetensors_is_one_error(tmp_path, header, data, reason):
    path = write_raw_safetensors(tmp_path / 'model.safetensors', header, data)
    with pytest.raises(hf_xl.HFImportError, match='is not a safetensors file') as e:
        hf_xl.read_safetensors(path)
    assert reason in str(e.value) and '\n' not in str(e.value)
    with open(path, 'wb') as f:  # a header size beyond the file: nothing of that size is read
        f.write(struct.pack('<Q', 1 << 62) + b'{}')
    with pytest.raises(hf_xl.HFImportError, match='does not fit in its 10 bytes'):
        hf_xl.read_safetensors(path)


MEASURE_READ = '''
import sys
import torch
from utils import hf_transfo_xl as hf_xl

def peak():  # this process's peak resident size (getrusage's counts the parent's size at the fork too)
    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024

before = peak()
state = hf_xl.read_safetensors(sys.argv[1])
print(peak() - before, sum(t.numel() * t.element_size() for t in state.values()))
'''


def test_the_safetensors_reader_needs_about_the_files_size(tmp_path):
    """Each tensor is read straight into its own memory: the reader's peak is about the file's size (a
    whole-file read then a copy of each tensor took twice, then three times that). A property of the reader,
    measured in a process of its own (its peak resident size before and after)."""
    tensors = {f't{i}': torch.randn(1 << 20) for i in range(48)}  # 192 MiB: far above the noise of a process
    path = tmp_path / 'big.safetensors'
    write_safetensors(tensors, path)
    del tensors
    out = subprocess.run([sys.executable, '-c', MEASURE_READ, str(path)], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.split()
    grown, held = int(out[0]), int(out[1])
    assert held == 192 << 20
    assert grown < 1.3 * os.path.getsize(path), f'the reader grew by {grown / 2 ** 20:.0f} MiB'


def hf_error(hf, work, capsys):
    assert cc.main([str(hf), '--work_dir', str(work)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('convert_checkpoint.py: error: ') and not work.exists(), err
    return err


def write_shards(hf, state, index):
    """state split into shards as `index` ({name: shard}) says, and the index itself; a tensor whose shard
    the index does not name goes into shard 'extra.safetensors'."""
    shards = {}
    for key, value in state.items():
        shards.setdefault(index.get(key, 'extra.safetensors'), {})[key] = value
    for shard, tensors in shards.items():
        write_safetensors(tensors, hf / shard)
    (hf / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': index}))


def test_a_sharded_model_takes_each_tensor_from_the_shard_its_index_names(tmp_path, capsys):
    model = our_model()
    hf = write_hf_dir(tmp_path / 'hf', model, symbols(N_TOKEN), safetensors=False)
    os.remove(hf / 'pytorch_model.bin')
    state = hf_keys(model)
    index = {k: f'model-0000{1 + i % 2}-of-00002.safetensors' for i, k in enumerate(state)}
    write_shards(hf, state, index)
    converted, _ = convert(hf, tmp_path / 'run')
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in model.state_dict().items())

    key = 'transformer.layers.0.dec_attn.o_net.weight'
    other = next(s for s in set(index.values()) if s != index[key])
    write_safetensors({k: v for k, v in state.items() if index[k] == other} | {key: torch.zeros_like(state[key])},
                      hf / other)  # a stray copy in the other shard (the later one, for one of them) used to win
    err = hf_error(hf, tmp_path / 'a', capsys)
    assert f'holds {key}, which model.safetensors.index.json puts in {index[key]}' in err
    write_shards(hf, state, index)
    (hf / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': {k: v for k, v in index.items()
                                                                                if k != key}}))
    assert f'holds {key}, which model.safetensors.index.json puts nowhere' in hf_error(hf, tmp_path / 'b', capsys)
    write_shards(hf, {k: v for k, v in state.items() if k != key}, index)
    assert f'puts {key} in {index[key]}, which does not hold it' in hf_error(hf, tmp_path / 'c', capsys)
    for bad in ([index], 'weights', {'weight_map': {key: 3}}, {'weight_map': []}, {'weight_map': {}}):
        (hf / 'model.safetensors.index.json').write_text(json.dumps(bad))
        assert 'is not a shard index' in hf_error(hf, tmp_path / 'd', capsys)
    (hf / 'model.safetensors.index.json').write_text('[' * 100_000 + ']' * 100_000)
    assert 'is not readable JSON (RecursionError' in hf_error(hf, tmp_path / 'e', capsys)


class Opaque:  # an object a weights-only load refuses
    pass


def test_weights_of_the_wrong_kind_are_refused_before_anything_is_written(tmp_path, capsys):
    model = our_model()
    hf = write_hf_dir(tmp_path / 'hf', model, symbols(N_TOKEN))
    raw = (hf / 'model.safetensors').read_bytes()
    (n,) = struct.unpack('<Q', raw[:8])
    header = json.loads(raw[8:8 + n])
    header['transformer.word_emb.emb_layers.0.weight']['dtype'] = 'I32'  # float bits read as integers ~1e9
    write_raw_safetensors(hf / 'model.safetensors', header, raw[8 + n:])
    assert 'word_emb.emb_layers.0.weight is a torch.int32 tensor' in hf_error(hf, tmp_path / 'run', capsys)

    hf = write_hf_dir(tmp_path / 'bin', model, symbols(N_TOKEN), safetensors=False)
    state = torch.load(hf / 'pytorch_model.bin', weights_only=True)
    torch.save({**state, 3: torch.zeros(1)}, hf / 'pytorch_model.bin')
    assert 'is not a state dict' in hf_error(hf, tmp_path / 'run', capsys)
    state['transformer.layers.0.dec_attn.r_w_bias'][0, 0] = float('nan')
    torch.save(state, hf / 'pytorch_model.bin')
    assert 'layers.0.dec_attn.r_w_bias holds NaN or infinite values' in hf_error(hf, tmp_path / 'run', capsys)
    torch.save({**state, 'extra': Opaque()}, hf / 'pytorch_model.bin', _use_new_zipfile_serialization=False)
    err = hf_error(hf, tmp_path / 'run', capsys)
    assert 'holds pickled Python objects' in err and 'weights_only' not in err  # never torch's advice to unpickle


def test_a_vocabulary_or_configuration_that_is_not_text_is_named(tmp_path, capsys):
    hf = write_hf_dir(tmp_path / 'hf', our_model(), symbols(N_TOKEN))
    (hf / 'vocab.txt').write_bytes(b'w0\n\xff\xfe\n')
    assert f'{hf}/vocab.txt is not UTF-8 text' in hf_error(hf, tmp_path / 'run', capsys)
    (hf / 'config.json').write_text('[' * 100_000 + ']' * 100_000)
    assert 'config.json is not readable JSON' in hf_error(hf, tmp_path / 'run', capsys)


def test_a_configuration_declaring_more_than_the_weights_is_refused_before_building(tmp_path):
    """A 400-byte config.json declaring a billion layers, tokens, heads or inner units: refused by comparing
    with the weights before any layer is built (it took memory until the machine ran out), in a process that
    may not grow by more than 1 GiB."""
    model = our_model()
    config = hf_config_json(model)
    argvs = []
    for key in ('vocab_size', 'd_inner', 'n_head', 'n_layer'):
        hf = write_hf_dir(tmp_path / key, model, symbols(N_TOKEN))
        (hf / 'config.json').write_text(json.dumps({**config, key: 10 ** 9}))
        argvs.append([hf, '--work_dir', tmp_path / f'run-{key}'])
    codes, errors = convert_with_memory_limit(argvs)
    assert codes == [2, 2, 2, 2], errors
    assert all('do not fit the model: size mismatch for' in e for e in errors[:3]), errors
    assert 'n_layer=1000000000 but the weights hold 2 layers' in errors[3]
    assert len(errors) == 4 and not any((tmp_path / f'run-{key}').exists() for key in config)


@pytest.mark.parametrize('changes,message', [
    ({'cutoffs': 12}, 'cutoffs is 12, not a list of token ids'),
    ({'cutoffs': 'ab'}, "cutoffs is 'ab', not a list of token ids"),
    ({'cutoffs': [12, 'x']}, "cutoffs=[12, 'x']: must be a list of int"),
    ({'dropout': 'x'}, "dropout='x': must be a number"),
    ({'mem_len': 'x'}, "mem_len='x': must be an integer"),
    ({'mem_len': 1.5}, 'mem_len=1.5: must be an integer'),
    ({'d_embed': 'x'}, "d_embed='x': must be an integer"),
    ({'d_embed': [16]}, 'd_embed=[16]: must be an integer'),
    ({'n_layer': True}, 'n_layer=True: must be an integer'),
    ({'tie_projs': 5}, 'tie_projs=5: must be a list of bool'),
    ({'tie_projs': 'yes'}, "tie_projs='yes': must be a list of bool"),  # was tied: three true letters
    ({'tie_projs': [False, True, True, True]}, '4 entries, more than the 3 clusters of cutoffs=[12, 40]'),
    ({'same_length': 'false'}, "same_length='false': must be True or False"),  # was True: bool('false')
    ({'untie_r': 'true'}, "untie_r='true': must be True or False"),
    ({'clamp_len': 'x'}, "clamp_len='x': must be an integer"),  # was converted, then eval.py raised TypeError
    ({'sample_softmax': 'x'}, "sample_softmax 'x'; Hugging Face's model has none"),
    ({'sample_softmax': 8}, "sample_softmax 8; Hugging Face's model has none"),
    ({'layer_norm_epsilon': 'x'}, "layer_norm_epsilon 'x'; this model's LayerNorms use 1e-5"),
    ({'proj_share_all_but_first': 'no', 'tie_projs': None}, "tie_projs=[False, 'no', 'no']: must be a list of bool"),
], ids=lambda v: str(v) if isinstance(v, dict) else '')
def test_a_configuration_value_of_the_wrong_type_is_one_line(tmp_path, capsys, changes, message):
    hf = write_hf_dir(tmp_path / 'hf', our_model(), symbols(N_TOKEN))
    config = {**json.loads((hf / 'config.json').read_text()), **changes}
    (hf / 'config.json').write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    err = hf_error(hf, tmp_path / 'run', capsys)
    assert message in err and 'config.json' in err, err
