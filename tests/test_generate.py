"""generate.py and run/generation.py: the next-token filters against hand-computed distributions, the memory
carried between steps against recomputing the whole context, seeded determinism, every dataset's decoding, and
the command line's errors."""
import functools
import os
import signal

import pytest
import torch
import torch.nn as nn

import generate
from conftest import make_enwik8_dir, make_run, tiny_model
from run.generation import Decoder, TextCodec, generate as generate_tokens, next_token_probs, sample_next
from utils.vocabulary import Vocab

P = [0.5, 0.3, 0.15, 0.05]


# Routing that varies from token to token; a memory longer than the segments decoded.
make_model = functools.partial(tiny_model, n_token=30, init_std=0.3, router_bias_std=1.0, tgt_len=8, mem_len=32)


def full_context_log_probs(model, tokens):
    """Next-token log-probabilities after every position, from one pass over the whole sequence, no memory."""
    with torch.no_grad():
        hidden, _ = model._forward(tokens, mems=None)
        return model.log_prob(hidden)


# ------------------------------------------------------------------ choosing the next token

def probs(p=P, **kw):
    return next_token_probs(torch.tensor([p]).log(), **kw)[0]


@pytest.mark.parametrize('kw,expected', [
    (dict(), P),
    (dict(top_k=2), [0.625, 0.375, 0, 0]),
    (dict(top_p=0.7), [0.625, 0.375, 0, 0]),         # 0.5 < 0.7, 0.5 + 0.3 reaches it
    (dict(top_p=0.5), [1, 0, 0, 0]),                 # the most likely token alone holds 0.5
    (dict(top_p=0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    (dict(top_k=3, top_p=0.7), [0.625, 0.375, 0, 0]),
    (dict(temperature=0.5), [0.25 / 0.365, 0.09 / 0.365, 0.0225 / 0.365, 0.0025 / 0.365]),  # p**2, renormalised
    (dict(temperature=0), [1, 0, 0, 0]),
])
def test_next_token_distribution_by_hand(kw, expected):
    torch.testing.assert_close(probs(**kw), torch.tensor(expected, dtype=torch.float), atol=1e-6, rtol=1e-6)


def test_filters_do_not_depend_on_the_token_order():
    order = [2, 0, 3, 1]
    shuffled = probs([P[i] for i in order], top_k=3, top_p=0.9)
    torch.testing.assert_close(shuffled, probs(top_k=3, top_p=0.9)[order])


def test_samples_follow_the_filtered_distribution():
    log_probs = torch.tensor([P]).log().expand(40000, -1)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample_next(log_probs, g), minlength=4).double() / 40000
    torch.testing.assert_close(freq, torch.tensor(P, dtype=torch.float64), atol=0.01, rtol=0)
    freq = torch.bincount(sample_next(log_probs, g, top_p=0.7), minlength=4).double() / 40000
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64), atol=0.01, rtol=0)


# ------------------------------------------------------------------ memory between steps

@pytest.mark.parametrize('kw', [dict(), dict(pre_lnorm=True), dict(attn_type=1),
                                dict(moe=True, moe_num_expert=4, moe_top_k=2), dict(untie_r=True)],
                         ids=['attn0', 'pre-lnorm', 'attn1', 'moe', 'untie-r'])
def test_cached_steps_equal_recomputing_the_full_context(kw):
    model = make_model(**kw)
    tokens = torch.randint(0, 30, (30, 2), generator=torch.Generator().manual_seed(1))
    decoder = Decoder(model, chunk_len=4)
    stepped = [decoder.feed(tokens[:10])]  # the prompt, in segments of 4, 4 and 2
    stepped += [decoder.feed(tokens[t:t + 1]) for t in range(10, 30)]
    assert decoder.mems[0].shape[0] == 30  # memory long enough: nothing forgotten
    torch.testing.assert_close(torch.stack(stepped), full_context_log_probs(model, tokens)[9:],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kw', [dict(), dict(pre_lnorm=True, same_length=True), dict(attn_type=1),
                                dict(clamp_len=5, moe=True, moe_num_expert=4, moe_top_k=2),
                                dict(attn_type=2), dict(untie_r=True)],
                         ids=['attn0', 'pre-lnorm-same-length', 'attn1', 'clamp-moe', 'attn2-uncached', 'untie-r'])
def test_key_value_cache_equals_projecting_the_memory_again(kw):
    # mem_len 12 < 40 tokens: the memory slides, so the cache must drop its oldest rows as the memory does
    model = make_model(mem_len=12, **kw)
    tokens = torch.randint(0, 30, (40, 2), generator=torch.Generator().manual_seed(5))
    fast, plain = Decoder(model, chunk_len=5), Decoder(model, chunk_len=5, kv_cache=False)
    assert bool(fast.kv_caches) == (model.attn_type in (0, 1)) and not plain.kv_caches
    rows_projected = []  # in a cached step the layer projects the new token's rows only
    hook = model.layers[1].dec_attn.get_submodule('qkv_net' if fast.kv_caches else 'kv_net').register_forward_hook(
        lambda module, args, out: rows_projected.append(args[0].shape[0]))
    for decoder in (fast, plain):
        decoder.out = [decoder.feed(tokens[:13])] + [decoder.feed(tokens[t:t + 1]) for t in range(13, 40)]
        hook.remove()
    torch.testing.assert_close(torch.stack(fast.out), torch.stack(plain.out), atol=1e-5, rtol=1e-5)
    assert rows_projected[-27:] == ([1] * 27 if fast.kv_caches else [13] * 27)  # attn 2: memory + token
    assert all(getattr(layer.dec_attn, 'kv_cache', None) is None for layer in model.layers)  # only while feeding


def test_key_value_cache_is_not_used_for_another_memory():
    model = make_model(mem_len=12)
    tokens = torch.randint(0, 30, (20, 1), generator=torch.Generator().manual_seed(6))
    fast, plain = Decoder(model, chunk_len=4), Decoder(model, chunk_len=4, kv_cache=False)
    for decoder in (fast, plain):
        decoder.feed(tokens[:16])
        decoder.mems = [m.flip(0) for m in decoder.mems]  # e.g. a caller that edits the memory
    expected = fast.feed(tokens[16:17])
    torch.testing.assert_close(expected, plain.feed(tokens[16:17]), atol=1e-5, rtol=1e-5)


def test_memory_reaches_beyond_the_segment_length():
    """With mem_len 32 the prediction at step 20 depends on the first token, 20 > tgt_len = 8 tokens back."""
    model = make_model()
    a = torch.randint(0, 30, (20, 1), generator=torch.Generator().manual_seed(2))
    b = a.clone()
    b[0] = (a[0] + 1) % 30
    last = [Decoder(model, 8).feed(x) for x in (a, b)]
    assert (last[0] - last[1]).abs().max() > 1e-4


def test_without_memory_every_step_reruns_the_last_segment():
    model = make_model(mem_len=0)
    tokens = torch.randint(0, 30, (12, 1), generator=torch.Generator().manual_seed(3))
    decoder = Decoder(model, chunk_len=5)
    decoder.feed(tokens[:9])
    got = decoder.feed(tokens[9:10])
    torch.testing.assert_close(got, full_context_log_probs(model, tokens[5:10])[-1])


def test_generation_equals_sampling_from_the_full_context_each_step():
    model = make_model()
    prompt = torch.randint(0, 30, (6, 2), generator=torch.Generator().manual_seed(4))
    out = generate_tokens(model, prompt, 15, torch.Generator().manual_seed(7), chunk_len=8, top_p=0.9)
    g, seq = torch.Generator().manual_seed(7), prompt
    for _ in range(15):
        token = sample_next(full_context_log_probs(model, seq)[-1], g, top_p=0.9)
        seq = torch.cat([seq, token[None]])
    assert torch.equal(out, seq[6:])


def test_same_seed_same_tokens():
    model = make_model()
    prompt = torch.tensor([[1], [2], [3]])
    runs = [generate_tokens(model, prompt, 20, torch.Generator().manual_seed(s), 8) for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


# ------------------------------------------------------------------ text <-> tokens

def vocab(symbols, **kw):
    v = Vocab(**kw)
    v.set_symbols(symbols)
    return v


def test_enwik8_bytes():
    text = 'caf\u00e9 <b>\n'
    syms = sorted({str(b) for b in text.encode()} - {'10'})
    codec = TextCodec(vocab(syms, special=[], lower_case=False), 'enwik8')
    ids = codec.encode(text)
    assert [syms[i] for i in ids] == [str(b) for b in 'caf\u00e9 <b>'.encode()]  # the newline is not a token
    assert codec.decode(ids) == 'caf\u00e9 <b>'
    assert codec.decode(ids[:4]) == 'caf\ufffd'  # half of a UTF-8 character
    with pytest.raises(ValueError, match=r"not in the enwik8 vocabulary, which has no <unk>: byte 122 \(b'z'\)"):
        codec.encode('cz')


def test_text8_characters():
    codec = TextCodec(vocab(list('_abcdefghijklmnopqrstuvwxyz'), special=[], lower_case=False), 'text8')
    ids = codec.encode('the cat')
    assert ids == [20, 8, 5, 0, 3, 1, 20]
    assert codec.decode(ids) == 'the cat'
    with pytest.raises(ValueError, match=r"2 token\(s\) .* text8 vocabulary, which has no <unk>: 'T', '!'"):
        codec.encode('The cat!')


def test_word_level_eos_and_unk():
    codec = TextCodec(vocab(['<eos>', 'the', 'cat', '<unk>', 'sat'], special=['<eos>'], lower_case=False), 'wt103')
    ids = codec.encode('the cat\nthe dog sat')
    assert ids == [1, 2, 0, 1, 3, 4]
    assert codec.decode(ids) == 'the cat\nthe <unk> sat'
    assert codec.encode('') == [0]  # an empty prompt starts a line
    assert codec.decode([1, 0, 0, 2]) == 'the\n\ncat'


def test_ptb_lower_cases_and_word_level_without_unk_names_the_words():
    codec = TextCodec(vocab(['<eos>', 'the', 'cat'], special=['<eos>'], lower_case=True), 'ptb')
    assert codec.encode('The CAT') == [1, 2]
    with pytest.raises(ValueError, match="'dog'"):
        codec.encode('the dog')


def test_lm1b_sentences():
    codec = TextCodec(vocab(['<S>', '</S>', '<UNK>', 'A', 'cat', 'sat'], special=[], lower_case=False), 'lm1b')
    ids = codec.encode('A cat sat\nA dog')
    assert ids == [0, 3, 4, 5, 0, 0, 3, 2]  # <S> A cat sat <S> <S> A <UNK>
    assert codec.decode(ids + [5, 0, 0, 4]) == 'A cat sat\nA <UNK> sat\ncat'


# ------------------------------------------------------------------ the command line

def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what building the corpus printed
    code = generate.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_same_seed_same_text(tmp_path, capsys):
    run, _, _ = make_run(tmp_path, moe=True, moe_num_expert=3, moe_top_k=2)
    args = ['--work_dir', run, '--prompt', '<title>An', '--max_tokens', '30', '--top_k', '10']
    code, first, err = run_cli(capsys, *args, '--seed', '3')
    assert code == 0 and first.startswith('<title>An') and 'tokens/s' in err
    assert run_cli(capsys, *args, '--seed', '3')[1] == first
    assert run_cli(capsys, *args, '--seed', '4')[1] != first


def test_cli_samples_output_file_and_checkpoint_path(tmp_path, capsys):
    run, _, _ = make_run(tmp_path)
    out = tmp_path / 'out.txt'
    code, stdout, _ = run_cli(capsys, '--work_dir', os.path.join(run, 'model.pt'), '--prompt_file',
                              str(_write(tmp_path / 'p.txt', 'Anarchism')), '--max_tokens', '5',
                              '--num_samples', '2', '--temperature', '0', '--output', str(out))
    assert code == 0 and stdout == ''
    text = out.read_text(encoding='utf-8')
    samples = text.split('=== sample 2 ===\n')
    assert text.startswith('=== sample 1 ===\nAnarchism') and len(samples) == 2
    assert samples[0][len('=== sample 1 ===\n'):] == samples[1]  # greedy: both samples are the same


def _write(path, text):
    path.write_text(text, encoding='utf-8')
    return path


def test_cli_errors(tmp_path, capsys):
    run, data, _ = make_run(tmp_path)

    def error(*argv):
        code, out, err = run_cli(capsys, *argv)
        last = err.strip().splitlines()[-1]  # after what loading the corpus reported
        assert code == 2 and out == '' and last.startswith('generate.py: error: ')
        return last

    assert 'does not exist' in error('--work_dir', str(tmp_path / 'nope'))
    assert f'--prompt_file {tmp_path} is a directory' in error('--work_dir', run, '--prompt_file', str(tmp_path))
    assert f'--output {tmp_path} is a directory' in error('--work_dir', run, '--output', str(tmp_path))
    assert 'is not writable' in error('--work_dir', run, '--output', '/proc/out.txt')
    assert '--temperature -1.0 must be a finite number >= 0' in error('--work_dir', run, '--temperature', '-1')
    assert '--top_p 0.0 must be in (0, 1]' in error('--work_dir', run, '--top_p', '0')
    assert '--max_tokens 0 must be at least 1' in error('--work_dir', run, '--max_tokens', '0')
    assert "byte 90 (b'Z')" in error('--work_dir', run, '--prompt', 'Zebra')
    assert 'the prompt is empty: give the text to continue (at least one character) with --prompt' in error(
        '--work_dir', run, '--prompt', '')
    # same_length without a memory masks every key: NaN probabilities, then a traceback from multinomial
    assert 'needs --mem_len > 0' in error('--work_dir', run, '--same_length', '--mem_len', '0')
    other = make_enwik8_dir(tmp_path / 'other', 'xyz 0\n')
    assert 'pass the --data/--dataset it was trained on' in error('--work_dir', run, '--data', other)
    torch.save(nn.Linear(2, 2), tmp_path / 'pickled.pt')  # a pickled module, as the original saved its model
    assert 'convert it first' in error('--work_dir', str(tmp_path / 'pickled.pt'), '--prompt', 'a')
    assert not os.path.exists(tmp_path / 'out.txt')


@pytest.mark.parametrize('kw', [dict(temperature=1e-45), dict(temperature=1e-320), dict(top_p=1e-300),
                                dict(top_p=5e-324, temperature=1e-300)])
def test_tiny_temperature_and_top_p_keep_the_most_likely_token(kw):
    """1e-45 is a float32 denormal and 1e-300 a float32 0: the division gave nan, the top_p filter dropped all."""
    torch.testing.assert_close(probs(**kw), torch.tensor([1., 0, 0, 0]))
    g = torch.Generator().manual_seed(0)
    assert sample_next(torch.tensor([P[::-1]]).log(), g, **kw).item() == 3


def test_cli_extreme_flags_are_one_line_errors(tmp_path, capsys):
    run, _, _ = make_run(tmp_path)
    for flags, message in [(['--seed', str(2 ** 70)], f'--seed {2 ** 70} must be between -2**63 and 2**64 - 1'),
                           (['--threads', '1000000'], '--threads 1000000 must be between 0'),
                           (['--num_samples', str(10 ** 9)], f'--num_samples {10 ** 9} of --max_tokens 200 need about'),
                           (['--max_tokens', str(10 ** 12)], f'--num_samples 1 of --max_tokens {10 ** 12} need'),
                           (['--temperature', 'inf'], '--temperature inf must be a finite number')]:
        code, out, err = run_cli(capsys, '--work_dir', run, '--prompt', 'An', *flags)
        assert code == 2 and out == '' and err.strip().splitlines()[-1].startswith('generate.py: error: ' + message)


def test_cli_ctrl_c_writes_the_text_so_far(tmp_path, capsys, monkeypatch):
    """Ctrl-C during a long generation lost the text generated so far, with a KeyboardInterrupt traceback."""
    run, _, _ = make_run(tmp_path)
    args = ['--work_dir', run, '--prompt', '<title>An', '--seed', '5', '--num_samples', '2']
    code, four_tokens, _ = run_cli(capsys, *args, '--max_tokens', '4')
    assert code == 0
    feed, calls = Decoder.feed, [0]

    def ctrl_c_at_the_fifth_feed(self, tokens):   # the prompt, then four tokens
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return feed(self, tokens)
    monkeypatch.setattr(Decoder, 'feed', ctrl_c_at_the_fifth_feed)
    # Ctrl-C as a terminal delivers it: a suite started in the background (nohup ... &) inherits SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, out, err = run_cli(capsys, *args, '--max_tokens', '1000')
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 128 + signal.SIGINT and 'Interrupted after 4 of 1000 tokens' in err
    assert out == four_tokens
