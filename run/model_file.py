"""model.pt: one model as plain data, and the one way to write it (save_model) and to read it (load_model).

train.py writes the best model of a run as WORK_DIR/model.pt; convert_checkpoint.py writes an imported or
upcycled one; eval.py, generate.py, moe_report.py, study.py and train.py --restart_dir read them. The file is a
dict (utils.checkpoint.FORMAT, kind 'model'), read with torch.load(weights_only=True):

    config         the model's ModelConfig as the flat dict of MemTransformerLM's keywords (ModelConfig.to_dict)
    model_state    the weights (state-dict keys as the original's)
    vocab          an imported model's own vocabulary, symbols in id order (only when it has one)
    ...            what the writer knows besides: args (train.py's flags, or an import's dataset and data),
                   step, val_loss, vocab_symbols (the corpus trained on), converted_from

Files written before the configuration was typed hold the same flat dict; the options they predate take
their defaults (ModelConfig.from_dict).
"""
import os

import torch

from mem_transformer import MemTransformerLM, ModelConfig
from utils import checkpoint as ckpt
from utils.exp_utils import physical_memory


def model_path(path):
    """A run directory means its model, DIR/model.pt; a file is taken as it is."""
    return os.path.join(path, 'model.pt') if os.path.isdir(path) else path


def model_file(model, model_state=None, vocab=None, **info):
    """model.pt's dict for `model` (its config, and model_state or its own state_dict)."""
    saved = {'format': ckpt.FORMAT, 'kind': 'model', 'config': model.config.to_dict(),
             'model_state': model.state_dict() if model_state is None else model_state, **info}
    if vocab is not None:
        saved['vocab'] = vocab
    return saved


def save_model(path, model, model_state=None, vocab=None, **info):
    """Write model.pt atomically (a run killed mid-write keeps the previous file). model_state: the weights to
    store when they are not model.state_dict() (an expert-parallel run's, gathered from every process)."""
    ckpt.atomic_save(model_file(model, model_state, vocab, **info), path)


def saved_config(saved, path):
    """The ModelConfig that a model.pt's or checkpoint.pt's dict holds; a one-line CheckpointError naming
    `path` when this code rejects it."""
    try:
        return ModelConfig.from_dict(saved['config'])
    except ValueError as e:
        raise ckpt.CheckpointError(f'{path} holds a model configuration this code rejects: {e}') from None


def read_model_file(path):
    """(ModelConfig, the file's dict) of a model.pt or a run directory's; a one-line CheckpointError when the
    file or its configuration cannot be used."""
    path = model_path(path)
    saved = ckpt.load_run_file(path, 'model')
    return saved_config(saved, path), saved


def load_model(path, device='cpu'):
    """(model in evaluation mode on `device`, the file's dict) from a model.pt or a run directory's."""
    config, saved = read_model_file(path)
    check_fits_memory(config, model_path(path))
    model = MemTransformerLM(config)
    ckpt.load_weights(model, saved['model_state'], model_path(path))
    return model.to(device).eval(), saved


def weights_beyond_memory(model):
    """(parameters, bytes of their fp32 weights, this machine's memory) when those weights alone need more than
    the memory, else None. For a model on the meta device, before the real one is built."""
    total = model.parameter_counts()['total']
    need, have = 4 * total, physical_memory()
    return (total, need, have) if need > have else None


def check_fits_memory(config, path):
    """Refuse, in one line, a file whose configuration declares more fp32 weights than this machine's memory (a
    damaged file, or one made for a larger machine) before the model is built: counted on the meta device, which
    allocates nothing, where building it would end in an allocation error."""
    with torch.device('meta'):
        beyond = weights_beyond_memory(MemTransformerLM(config))
    if beyond is not None:
        total, need, have = beyond
        raise ckpt.CheckpointError(f'{path} holds a model of {total:.3g} parameters, {need / 2 ** 30:,.1f} GiB of '
                                   f'weights, more than the {have / 2 ** 30:,.1f} GiB of memory of this machine: '
                                   'load it on a machine where it fits, or check that it is the file you meant')
