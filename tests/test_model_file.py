"""model.pt (run/model_file.py): the one writer and reader, plain data, and files written before the typed
configuration (tests/data/v1_run, by train.py at ad660eb) loading and resuming as they did."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import train
from conftest import tiny_model, write_corpus
from mem_transformer import MemTransformerLM, ModelConfig, init_weights
from moe import MoEConfig
from run.model_file import load_model, model_path, read_model_file, save_model
from utils import checkpoint as ckpt

V1 = Path(__file__).resolve().parent / 'data' / 'v1_run'
EXPECTED = json.loads((V1 / 'expected.json').read_text())


def plain_types(value):
    """Whether value is made of what a checkpoint may hold: numbers, strings, None, lists, dicts."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_types(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain_types(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def segment_losses(model):
    """The losses expected.json holds: two segments of a fixed batch, the memory carried."""
    data = torch.arange(24).remainder(model.n_token).view(12, 2)
    with torch.no_grad():
        loss, *mems = model(data[:6], data[1:7])
        loss2, *_ = model(data[6:11], data[7:12], *mems)
    return [loss, loss2]


def test_save_then_load_gives_the_same_model_and_plain_data(tmp_path):
    model = tiny_model(moe=True, moe_num_expert=3, moe_top_k=1, moe_gate='switch', cutoffs=[10, 20], div_val=2,
                       d_embed=16, untie_r=True)
    save_model(tmp_path / 'model.pt', model, args={'dataset': 'enwik8'}, step=7)
    saved = torch.load(tmp_path / 'model.pt', weights_only=True)
    assert plain_types(saved['config']) and saved['config'] == dict(model.config)
    assert (saved['step'], saved['args'], saved['kind']) == (7, {'dataset': 'enwik8'}, 'model')
    loaded, again = load_model(tmp_path)   # a run directory means its model.pt
    assert loaded.config == model.config and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert model_path(tmp_path) == str(tmp_path / 'model.pt') and again['step'] == 7


def test_a_model_file_written_before_the_typed_configuration_gives_its_losses():
    config, saved = read_model_file(V1 / 'model.pt')
    assert {k: config[k] for k in saved['config']} == saved['config']   # the old flat dict, key for key
    model, _ = load_model(V1 / 'model.pt')
    assert config.moe and config.moe_options.gate == 'gshard' and config.moe_options.shared_expert == 1
    expected = [torch.tensor(losses) for losses in EXPECTED['model_losses']]
    for got, want in zip(segment_losses(model), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)   # the same computation, up to rounding


def test_a_config_without_the_newer_options_takes_their_defaults(tmp_path):
    saved = ckpt.load(V1 / 'model.pt', 'model')
    newer = ('untie_r', 'moe_shared_expert', 'moe_gate_bias', 'moe_switch_eps', 'moe_random_routing')
    for key in newer:
        del saved['config'][key]
    saved['config']['d_embed'] = None   # the constructor's old spelling of d_embed = d_model
    ckpt.atomic_save(saved, tmp_path / 'model.pt')
    config, _ = read_model_file(tmp_path / 'model.pt')
    assert (config.untie_r, config.moe_options.shared_expert, config.moe_options.gate_bias) == (False, 0, True)
    assert config.d_embed == config.d_model


def test_a_config_this_code_rejects_is_one_line_naming_the_file(tmp_path):
    saved = ckpt.load(V1 / 'model.pt', 'model')
    saved['config']['moe_top_k'] = 9
    ckpt.atomic_save(saved, tmp_path / 'model.pt')
    with pytest.raises(ckpt.CheckpointError, match=r'model\.pt holds a model configuration this code rejects: '
                                                   r'moe_top_k=9: must be between 1 and moe_num_expert=3$'):
        load_model(tmp_path / 'model.pt')


def test_a_dense_model_loads_whatever_its_unused_moe_options_say(tmp_path):
    """MoE options that MoEConfig rejects (a switch gate routing to 2 experts, top-k above the experts) shape
    nothing in a dense model: its file loads, with the same weights and losses; an MoE model's is refused."""
    model = tiny_model()
    save_model(tmp_path / 'model.pt', model)
    saved = ckpt.load(tmp_path / 'model.pt', 'model')
    saved['config'].update(moe_gate='switch', moe_top_k=2, moe_num_expert=1)
    ckpt.atomic_save(saved, tmp_path / 'model.pt')
    loaded, _ = load_model(tmp_path / 'model.pt')
    assert not loaded.config.moe and loaded.config.moe_options == MoEConfig()
    assert all(torch.equal(a, b) for a, b in zip(segment_losses(loaded), segment_losses(model.eval())))
    saved['config']['moe'] = True
    ckpt.atomic_save(saved, tmp_path / 'model.pt')
    with pytest.raises(ckpt.CheckpointError, match='rejects: moe_top_k=2: must be between 1 and moe_num_expert=1'):
        load_model(tmp_path / 'model.pt')


def test_a_model_larger_than_memory_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """The fp32 weights the configuration declares against the machine's memory: at the boundary, and before any
    weight-sized allocation (the model is counted on the meta device)."""
    import run.model_file as model_file
    model, _ = load_model(V1 / 'model.pt')
    need = 4 * sum(p.numel() for p in set(model.parameters()))
    monkeypatch.setattr(model_file, 'physical_memory', lambda: need)
    load_model(V1 / 'model.pt')
    monkeypatch.setattr(model_file, 'physical_memory', lambda: need - 1)
    built = []
    monkeypatch.setattr(model_file, 'MemTransformerLM',
                        lambda config: built.append(torch.empty(0).device.type) or MemTransformerLM(config))
    with pytest.raises(ckpt.CheckpointError, match=r'model\.pt holds a model of .* parameters, .* GiB of weights, '
                                                   r'more than the .* GiB of memory of this machine: load it on a '
                                                   r'machine where it fits'):
        load_model(V1 / 'model.pt')
    assert built == ['meta']


def test_scripts_refuse_a_model_file_declaring_more_than_any_memory_in_one_line(tmp_path, capsys):
    """A damaged config (d_inner 10^11: 10^13 weights) gave an allocation traceback in eval.py, generate.py,
    moe_report.py and convert_checkpoint.py --upcycle; now one line and exit code 2, nothing written."""
    import eval as evaluation
    import generate
    import moe_report
    from conftest import convert_with_memory_limit
    saved = ckpt.load(V1 / 'model.pt', 'model')
    saved['config']['d_inner'] = 10 ** 11
    run = tmp_path / 'run'
    run.mkdir()
    ckpt.atomic_save(saved, run / 'model.pt')
    for main in (evaluation.main, generate.main, moe_report.main):
        try:
            code = main(['--work_dir', str(run)])
        except SystemExit as e:
            code = e.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and 'more than the' in lines[0], (main, lines)
    codes, errors = convert_with_memory_limit([['--upcycle', run, '--moe-num-expert', '4', '--moe-top-k', '2',
                                                '--work_dir', tmp_path / 'out']])
    assert codes == [2] and len(errors) == 1 and 'more than the' in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run']


def test_a_checkpoint_written_before_the_typed_configuration_resumes_exactly(tmp_path):
    """train.py --restart on checkpoint.pt and model.pt of ad660eb: the same losses as that code's resume."""
    corpus = write_corpus(tmp_path / 'corpus', sizes=EXPECTED['corpus_sizes'])
    work = tmp_path / 'run'
    work.mkdir()
    for name in ('checkpoint.pt', 'model.pt'):
        shutil.copy(V1 / name, work / name)
    assert train.main(['--data', str(corpus), '--work_dir', str(work), *EXPECTED['flags'],
                       '--max_step', str(EXPECTED['resumed_steps']), '--restart']) == 0
    records = [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]
    resumed = [(r['step'], r['split'], r['loss']) for r in records if r['step'] > EXPECTED['steps']]
    assert [(s, split) for s, split, _ in resumed] == [(s, split) for s, split, _ in EXPECTED['resumed']]
    assert [loss for *_, loss in resumed] == pytest.approx([loss for *_, loss in EXPECTED['resumed']], rel=1e-6)
    log = (work / 'log.txt').read_text()
    assert 'Resuming from' in log and 'max_step: 3 in the checkpoint, 6 now' in log
    state = ckpt.load(work / 'checkpoint.pt')
    assert plain_types(state['config']) and ModelConfig.from_dict(state['config']) == read_model_file(V1)[0]


def test_the_original_constructor_call_and_the_config_build_the_same_model():
    config = ModelConfig(n_token=40, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=24, dropout=0.1,
                         tgt_len=6, mem_len=6, moe=True)
    torch.manual_seed(0)
    a = init_weights(MemTransformerLM(config))
    torch.manual_seed(0)
    b = init_weights(MemTransformerLM(40, 2, 2, 16, 8, 24, 0.1, 0.0, tgt_len=6, mem_len=6, moe=True))
    assert a.config == b.config
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
