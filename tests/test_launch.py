"""utils/launch.sh, the run scripts' launcher: python, or torchrun with one process per GPU (--multi_gpu) or NPROC.

The scripts run with PYTHON set to a fake interpreter that prints its command line (conftest.launch); asked for
the number of visible GPUs (`python -c ...`) it answers FAKE_GPUS, so a machine with any number of GPUs can be
pretended.
"""
import pytest

from conftest import ROOT, launch


def test_multi_gpu_launches_one_process_per_visible_gpu(tmp_path):
    out = launch(tmp_path, 'run_enwik8_base.sh', 'train', FAKE_GPUS='4')
    assert out[:2] == ['Run training...', '--multi_gpu: torchrun with 4 processes, one per visible GPU '
                                          '(NPROC=N to choose)']
    assert out[2:9] == ['-m', 'torch.distributed.run',
                        '--standalone', '--nproc_per_node', '4', str(ROOT / 'train.py'), '--cuda']
    assert '--multi_gpu' in out and '--gpu0_bsz' in out  # train.py says what it makes of them


@pytest.mark.parametrize('gpus', ['0', '1'])
def test_multi_gpu_without_several_gpus_runs_one_process(tmp_path, gpus):
    out = launch(tmp_path, 'run_wt103_large.sh', 'train', FAKE_GPUS=gpus)
    assert out[:3] == ['Run training...', f'--multi_gpu: {gpus} GPU visible: one process', str(ROOT / 'train.py')]


def test_nproc_and_torchrun_args_win_over_the_gpu_count(tmp_path):
    out = launch(tmp_path, 'run_wt103_base.sh', 'train', FAKE_GPUS='8', NPROC='4', TORCHRUN_ARGS='--nnodes 2')
    assert out[1:8] == ['-m', 'torch.distributed.run', '--nproc_per_node', '4', '--nnodes', '2',
                        str(ROOT / 'train.py')]
    assert f'{ROOT}/data/wikitext-103/' in out  # a relative DATA_ROOT is taken from the repository
    out = launch(tmp_path, 'run_wt103_base.sh', 'train', FAKE_GPUS='8', NPROC='1')
    assert out[1] == str(ROOT / 'train.py')


def test_amp_chooses_the_training_precision(tmp_path):
    assert '--amp' not in launch(tmp_path, 'run_text8_base.sh', 'train', NPROC='1')  # the original's fp32
    out = launch(tmp_path, 'run_text8_base.sh', 'train', '--amp', 'fp16', NPROC='1', AMP='bf16')
    assert out[-4:] == ['--amp', 'bf16', '--amp', 'fp16']  # flags given after the mode still win
    assert '--amp' not in launch(tmp_path, 'run_text8_base.sh', 'eval', NPROC='1', AMP='bf16')


def test_evaluation_uses_one_process_unless_asked(tmp_path):
    out = launch(tmp_path, 'run_enwik8_base.sh', 'eval', FAKE_GPUS='4')  # the original's eval has no --multi_gpu
    assert out[:2] == ['Run evaluation...', str(ROOT / 'eval.py')]
    out = launch(tmp_path, 'run_enwik8_base.sh', 'eval', FAKE_GPUS='4', NPROC='2')
    assert out[1:6] == ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
