#!/usr/bin/env python
"""Split text8 into train/valid/test.txt in the format of the original
Transformer-XL prep_text8.py: the last --test characters are test, the --valid
characters before them valid, the rest train (90M/5M/5M for text8); each part
is stripped and written as space-separated characters with '_' for a space.
The untokenized text goes to train.txt.raw etc.

    python prep_text8.py --input text8.zip --out ../data/text8
"""

import sys

from utils.prep import PrepError, blocks, run


def decode(raw, path):
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError as err:
        raise PrepError('{} is not UTF-8 text (byte {}): is it text8?'.format(
            path, err.start)) from None


def tokenize(part, desc):
    chars = part.strip().replace(' ', '_')
    for i, block in blocks(chars, desc):
        yield (' ' if i else '') + ' '.join(block)


if __name__ == '__main__':
    sys.exit(run('text8', 'characters', __doc__.split('\n\n')[0],
                 decode=decode, tokenize=tokenize))
