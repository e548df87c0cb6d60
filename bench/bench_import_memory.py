"""Memory of reading a Hugging Face model.safetensors (utils/hf_transfo_xl.read_safetensors).

Writes a file of random float32 tensors (the safetensors library's own writer), then reads it with this
repository's reader in a fresh process and prints how much that process's peak resident size grew, against
the file's size. The reader reads each tensor straight into its own memory: the growth is about 1x the file.

    python bench/bench_import_memory.py [--mib 310]
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

READ = '''
import sys
from utils import hf_transfo_xl as hf_xl

def peak():  # this process's peak resident size (getrusage's would count the parent's size at the fork too)
    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024

before = peak()
hf_xl.read_safetensors(sys.argv[1])
print(peak() - before)
'''


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--mib', type=int, default=310, help='size of the file, in MiB of tensors of 4 MiB')
    args = parser.parse_args(argv)
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'model.safetensors')
        save_file({f't{i}': torch.randn(1 << 20) for i in range(args.mib // 4)}, path)
        grown = int(subprocess.run([sys.executable, '-c', READ, path], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout)
        size = os.path.getsize(path)
    print(f'file {size / 2 ** 20:.0f} MiB: the reader\'s peak resident size grew by {grown / 2 ** 20:.0f} MiB '
          f'({grown / size:.2f}x the file)')


if __name__ == '__main__':
    main()
