"""moe_report.py: the routing statistics on a hand-checked example, and end to end on models whose routing is
known in advance (fixed gate biases), including the tokens a capacity-limited gate drops."""
import json
import math
import os

import pytest
import torch

import data_utils
import moe_report
from moe_report import BYTE_CLASSES, LayerRouting, byte_class
from conftest import make_run

LETTERS, DIGITS, WHITESPACE = 0, 1, 2


def test_statistics_on_a_hand_checked_example():
    # 4 tokens, 3 experts, top-2; token 2's second copy was dropped by a capacity limit.
    routing = LayerRouting(num_expert=3, top_k=2, n_classes=len(BYTE_CLASSES))
    expert = torch.tensor([[0, 1], [0, 2], [0, -1], [1, 0]])
    score = torch.tensor([[.6, .4], [.7, .3], [.9, .1], [.5, .5]])
    routing.add(expert, score, torch.tensor([LETTERS, DIGITS, LETTERS, WHITESPACE]))
    s = routing.summary(BYTE_CLASSES)

    # Copies per expert: 4, 2, 1 of 7 kept; mean 7/3.
    assert s['tokens'] == 4 and s['copies'] == 7
    assert s['share'] == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert s['confidence'] == pytest.approx([(.6 + .7 + .9 + .5) / 4, (.4 + .5) / 2, .3])
    assert s['mean_top_score'] == pytest.approx((.6 + .7 + .9 + .5) / 4)  # each token's best expert
    assert s['max_over_mean'] == pytest.approx(4 / (7 / 3))
    std = math.sqrt(((4 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (1 - 7 / 3) ** 2) / 3)
    assert s['cv'] == pytest.approx(std / (7 / 3))
    assert s['dropped'] == 1 and s['dropped_fraction'] == pytest.approx(1 / 8)
    # Expert 0 took letters, a digit and a space; expert 2 only the digit.
    assert s['class_share'][0][:3] == pytest.approx([0.5, 0.25, 0.25])
    assert s['top_class'] == ['letters', 'letters', 'digits']
    # Overall 3/7 letters, 2/7 digits, 2/7 whitespace: expert 2's digit share 1 is 3.5x that.
    assert s['class_lift'][2][DIGITS] == pytest.approx(3.5)
    assert s['most_over_represented'][2] == 'digits'


def test_running_counts_add_up_over_batches():
    one, two = LayerRouting(4, 1, 0), LayerRouting(4, 1, 0)
    expert, score = torch.tensor([[0], [3], [3], [1], [-1]]), torch.rand(5, 1)
    one.add(expert, score)
    two.add(expert[:2], score[:2])
    two.add(expert[2:], score[2:])
    whole, in_parts = one.summary(), two.summary()
    assert whole.keys() == in_parts.keys()
    for key, value in whole.items():
        values = value if isinstance(value, list) else [value]
        parts = in_parts[key] if isinstance(value, list) else [in_parts[key]]
        assert [v is None for v in values] == [v is None for v in parts], key
        assert [v for v in values if v is not None] == pytest.approx([v for v in parts if v is not None]), key
    assert whole['confidence'][2] is None  # an expert that got nothing


@pytest.mark.parametrize('char,name', [('a', 'letters'), ('Z', 'letters'), ('7', 'digits'), (' ', 'whitespace'),
                                       ('\n', 'whitespace'), ('<', 'markup'), ('|', 'markup'), ('&', 'markup'),
                                       (',', 'punctuation'), ("'", 'punctuation'), (chr(0xc3), 'non-ASCII')])
def test_byte_classes(char, name):
    assert BYTE_CLASSES[byte_class(char)] == name


# ------------------------------------------------------------------ the figure

def hand_checked_layers():
    """Layer 0: the hand-checked example above (shares 4/7, 2/7, 1/7 of 3 experts); layer 1: an even layer."""
    first = LayerRouting(num_expert=3, top_k=2, n_classes=len(BYTE_CLASSES))
    first.add(torch.tensor([[0, 1], [0, 2], [0, -1], [1, 0]]), torch.tensor([[.6, .4], [.7, .3], [.9, .1], [.5, .5]]),
              torch.tensor([LETTERS, DIGITS, LETTERS, WHITESPACE]))
    even = LayerRouting(num_expert=3, top_k=1, n_classes=len(BYTE_CLASSES))
    even.add(torch.tensor([[0], [1], [2]]), torch.tensor([[.5], [.5], [.5]]), torch.tensor([LETTERS] * 3))
    return [dict(layer=i, gate='naive', **r.summary(BYTE_CLASSES)) for i, r in enumerate((first, even))]


def cell_texts(ax):
    """{(row, column): text} of the numbers written on a heat map's cells."""
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}


def test_figure_has_numbers_an_even_share_in_the_neutral_colour_and_the_byte_classes():
    fig = moe_report.routing_figure(hand_checked_layers(), 'Expert routing of enwik8-moe on enwik8 valid')
    panels = [ax for ax in fig.get_axes() if ax.images]
    share, score, *classes = panels
    assert fig._suptitle.get_text() == 'Expert routing of enwik8-moe on enwik8 valid'
    assert 'even share: 33.3%' in share.get_title()
    # rows: experts, columns: layers; 4/7, 2/7, 1/7 of layer 0's copies and a third each in layer 1
    assert cell_texts(share) == {(0, 0): '57.1', (1, 0): '28.6', (2, 0): '14.3',
                                 (0, 1): '33.3', (1, 1): '33.3', (2, 1): '33.3'}
    image = share.images[0]
    neutral = image.cmap(0.5)
    assert image.cmap.name == 'RdBu_r' and min(neutral[:3]) > 0.9
    colours = image.to_rgba(image.get_array())
    for expert in range(3):   # the even layer is drawn in the neutral colour
        assert colours[expert, 1] == pytest.approx(neutral)
    assert colours[0, 0][0] > colours[0, 0][2] and colours[2, 0][2] > colours[2, 0][0]   # red above, blue below
    assert cell_texts(score)[(0, 0)] == f'{(.6 + .7 + .9 + .5) / 4:.2f}' and cell_texts(score)[(1, 0)] == '0.45'
    for ax in panels:   # every expert labelled
        assert [t.get_text() for t in ax.get_yticklabels()] == ['0', '1', '2']

    # the byte classes, one panel per layer: % of each expert's tokens in each class, coloured by lift
    assert len(classes) == 2
    names = [t.get_text().split('\n')[0] for t in classes[0].get_xticklabels()]
    assert names == list(BYTE_CLASSES)
    texts = cell_texts(classes[0])
    assert [texts[(0, c)] for c in range(3)] == ['50', '25', '25']   # expert 0: 2 letters, a digit, a space
    assert texts[(2, DIGITS)] == '100'
    lift = classes[0].images[0]
    assert lift.get_array()[2, DIGITS] == pytest.approx(3.5) and lift.norm(1.0) == pytest.approx(0.5)
    assert classes[0].get_xticklabels()[LETTERS].get_text() == 'letters\n43% of all'   # 3 of the 7 copies
    moe_report.plt.close(fig)


def test_figure_of_a_word_level_corpus_has_no_class_panels(tmp_path):
    layers = [{k: v for k, v in layer.items() if 'class' not in k and k != 'most_over_represented'}
              for layer in hand_checked_layers()]
    fig = moe_report.routing_figure(layers, 'run')
    assert len([ax for ax in fig.get_axes() if ax.images]) == 2
    moe_report.plt.close(fig)
    moe_report.write_heatmap(layers, tmp_path / 'r.png', 'run')
    assert (tmp_path / 'r.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# ------------------------------------------------------------------ end to end

def fixed_routing(bias):
    """Every token gets the same gate logits: the bias (zero weights)."""
    def prepare(model):
        for ff in model.moe_layers():
            ff.gate.gate.weight.zero_()
            ff.gate.gate.bias.copy_(torch.tensor(bias))
    return prepare


def segments(data, batch_size, tgt_len):
    corpus = data_utils.get_lm_corpus(data, 'enwik8')
    return [inp.numel() for inp, _, _ in corpus.get_iterator('valid', batch_size, tgt_len)]


def run_report(tmp_path, capsys, *argv):
    capsys.readouterr()
    code = moe_report.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_report_of_a_naive_gate_with_known_routing(tmp_path, capsys, monkeypatch):
    run, data, _ = make_run(tmp_path, fixed_routing([3., 2., 1., 0.]), moe=True, moe_num_expert=4, moe_top_k=2)
    titles, draw = [], moe_report.routing_figure
    monkeypatch.setattr(moe_report, 'routing_figure', lambda layers, title: titles.append(title) or draw(layers, title))
    code, out, _ = run_report(tmp_path, capsys, '--work_dir', run, '--batch_size', '2', '--tgt_len', '5')
    assert code == 0
    assert titles == [f'Expert routing of run on enwik8 valid ({sum(segments(data, 2, 5))} tokens)']
    report = json.loads((tmp_path / 'run' / 'moe_report.json').read_text())
    assert (tmp_path / 'run' / 'moe_report.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    n_tokens = sum(segments(data, 2, 5))
    top2 = torch.tensor([3., 2.]).softmax(0).tolist()
    for layer in report['layers']:
        assert layer['tokens'] == n_tokens and layer['copies'] == 2 * n_tokens
        assert layer['share'] == [0.5, 0.5, 0.0, 0.0]
        assert layer['confidence'][:2] == pytest.approx(top2) and layer['confidence'][2:] == [None, None]
        assert layer['max_over_mean'] == pytest.approx(2.0) and layer['cv'] == pytest.approx(1.0)
        assert layer['mean_top_score'] == pytest.approx(top2[0])
        assert layer['dropped'] == 0
        # Both experts see every token, so each sees the split's byte classes; the text is mostly letters.
        assert layer['class_share'][0] == pytest.approx(layer['class_share'][1])
        assert layer['top_class'][:2] == ['letters', 'letters']
        assert layer['class_lift'][0] == pytest.approx([1, 1, 1, 1, 1, 0])  # the text has no non-ASCII byte
    assert 'imbalance max/mean 2.00, CV 1.00' in out and '50.00%' in out


def test_report_counts_the_copies_a_capacity_limit_drops(tmp_path, capsys):
    run, data, _ = make_run(tmp_path, fixed_routing([3., 0., 0., 0.]), moe=True, moe_num_expert=4, moe_top_k=1,
                            moe_gate='switch')
    code, _, _ = run_report(tmp_path, capsys, '--work_dir', run, '--batch_size', '2', '--tgt_len', '5',
                            '--json', str(tmp_path / 'r.json'), '--png', str(tmp_path / 'r.png'))
    assert code == 0
    report = json.loads((tmp_path / 'r.json').read_text())
    # Switch gate in eval: capacity ceil(2.4 * N / 4) per expert and segment of N tokens; all choose expert 0.
    sizes = segments(data, 2, 5)
    kept = sum(min(n, math.ceil(2.4 * n / 4)) for n in sizes)
    for layer in report['layers']:
        assert layer['dropped'] == sum(sizes) - kept
        assert layer['share'] == [1.0, 0.0, 0.0, 0.0] and layer['copies'] == kept
        assert layer['confidence'][0] == pytest.approx(math.exp(3) / (math.exp(3) + 3))
        assert layer['mean_top_score'] == pytest.approx(layer['confidence'][0])  # over the tokens kept


def test_report_of_an_auxfree_gate_follows_its_selection_bias(tmp_path, capsys):
    """Equal logits, a selection bias toward experts 2 and 3: they get every token with scores 1/2 each
    (the bias chooses, the unbiased logits weigh)."""
    def prepare(model):
        fixed_routing([0., 0., 0., 0.])(model)
        for ff in model.moe_layers():
            ff.gate.expert_bias.copy_(torch.tensor([0., -1., 2., 1.]))
    run, data, _ = make_run(tmp_path, prepare, moe=True, moe_num_expert=4, moe_top_k=2, moe_gate='auxfree')
    code, out, _ = run_report(tmp_path, capsys, '--work_dir', run, '--batch_size', '2', '--tgt_len', '5')
    assert code == 0 and 'auxfree gate' in out
    for layer in json.loads((tmp_path / 'run' / 'moe_report.json').read_text())['layers']:
        assert layer['share'] == [0.0, 0.0, 0.5, 0.5]
        assert layer['confidence'][2:] == pytest.approx([0.5, 0.5])


def test_report_of_a_noisy_gate_counts_every_copy(tmp_path, capsys):
    run, data, _ = make_run(tmp_path, lambda model: None, moe=True, moe_num_expert=4, moe_top_k=2,
                            moe_gate='noisy')
    code, out, _ = run_report(tmp_path, capsys, '--work_dir', run, '--batch_size', '2', '--tgt_len', '5')
    assert code == 0 and 'noisy gate' in out
    n_tokens = sum(segments(data, 2, 5))
    for layer in json.loads((tmp_path / 'run' / 'moe_report.json').read_text())['layers']:
        assert layer['copies'] == 2 * n_tokens and layer['dropped'] == 0
        assert sum(layer['share']) == pytest.approx(1.0)


def test_report_errors(tmp_path, capsys):
    run, _, _ = make_run(tmp_path)  # a dense model

    def error(*argv):
        code, out, err = run_report(tmp_path, capsys, *argv)
        last = err.strip().splitlines()[-1]
        assert code == 2 and out == '' and last.startswith('moe_report.py: error: ')
        return last

    assert 'has no MoE layers' in error('--work_dir', run)
    assert 'does not exist' in error('--work_dir', str(tmp_path / 'nope'))
    assert '--batch_size 0 must be at least 1' in error('--work_dir', run, '--batch_size', '0')
    assert 'its directory' in error('--work_dir', run, '--json', str(tmp_path / 'no' / 'r.json'))
    moe_run, _, _ = make_run(tmp_path / 'moe', moe=True, moe_num_expert=2, same_length=True)
    assert 'needs --mem_len > 0' in error('--work_dir', moe_run, '--mem_len', '0')  # trained with same_length
    assert f'--json {tmp_path} is a directory' in error('--work_dir', moe_run, '--json', str(tmp_path))
    assert 'is not writable' in error('--work_dir', moe_run, '--png', '/proc/r.png')
    assert not [n for n in os.listdir(tmp_path / 'moe' / 'run') if n != 'model.pt']
    assert not (tmp_path / 'run' / 'moe_report.json').exists()
