#!/usr/bin/env python
"""Split enwik8 into train/valid/test.txt in the format of the original
prep_enwik8.py (Salesforce awd-lstm-lm, used by Transformer-XL): the last
--test bytes are test, the --valid bytes before them valid, the rest train
(90M/5M/5M for enwik8); every byte is written as its decimal value, separated
by spaces, except newline bytes, which stay newlines. The untokenized bytes go
to train.txt.raw etc.

    python prep_enwik8.py --input enwik8.zip --out ../data/enwik8
    python prep_enwik8.py --input samples/enwik8-sample.zip --out /tmp/x --valid 100000 --test 100000
"""

import sys

from utils.prep import blocks, run

# The token of each byte value. A newline byte is written as itself, so the
# loader (which splits lines on whitespace) never sees it: the original's
# enwik8 vocabulary has 204 symbols, not 205.
BYTE_TOKENS = [str(b) for b in range(256)]
BYTE_TOKENS[ord('\n')] = '\n'


def tokenize(part, desc):
    for i, block in blocks(part, desc):
        yield (' ' if i else '') + ' '.join(map(BYTE_TOKENS.__getitem__, block))


if __name__ == '__main__':
    sys.exit(run('enwik8', 'bytes', __doc__.split('\n\n')[0],
                 decode=lambda raw, path: raw, tokenize=tokenize))
