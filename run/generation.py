"""Sampling text from a trained model: next-token filtering, the decoding loop with segment memory, and the
text <-> token conversion of every dataset.

The loop feeds the prompt in segments of `chunk_len` tokens and then one token per step, handing the model the
memory of everything it has seen (up to `mem_len` hidden states per layer), so the context reaches back about
n_layer * mem_len tokens, far beyond the training segment. A step runs the layers for one token only. The memory
holds hidden states; with relative attention (attn_type 0 and 1) each layer also keeps the keys and values it
projected them to (mem_transformer.KVCache), so what a step still pays per memory position is the attention
itself (bench/bench_generate.py measures it). A model with mem_len 0 (a vanilla Transformer) gets the fallback:
every step re-runs the last `chunk_len` tokens.
"""
import math

import torch

from mem_transformer import kv_caching, new_kv_caches
from utils.errors import ConfigError

# ----------------------------------------------------------------------------- choosing the next token

def check_sampling(temperature, top_k, top_p):
    if not 0 <= temperature < math.inf:
        raise ConfigError(f'--temperature {temperature} must be a finite number >= 0 (0 = always the most likely '
                          'token)')
    if top_k < 0:
        raise ConfigError(f'--top_k {top_k} must be >= 0 (0 = no limit)')
    if not 0 < top_p <= 1:
        raise ConfigError(f'--top_p {top_p} must be in (0, 1] (1 = no limit)')


def next_token_probs(log_probs, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution a token is drawn from: [bsz, V] log-probabilities -> [bsz, V] probabilities.

    Temperature rescales the log-probabilities; top_k keeps the k most likely tokens; top_p keeps the smallest
    set of most likely tokens whose probability reaches top_p (nucleus sampling, always at least one). The kept
    tokens are renormalised. temperature 0 puts all mass on the most likely token.

    The work is in float64 and the scores are shifted so that the best is 0 before they are divided: a tiny
    temperature (1e-45) or top_p (1e-300) is no float32 denormal or 0, and the division sends the other scores
    to -inf, never the best one to nan.
    """
    scores = log_probs.double()
    if temperature == 0:
        return torch.zeros_like(scores).scatter_(-1, scores.argmax(-1, keepdim=True), 1.0).float()
    scores = (scores - scores.max(-1, keepdim=True).values) / temperature
    if 0 < top_k < scores.size(-1):
        kth_best = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, -float('inf'))
    if top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        # A token stays if the tokens ranked above it hold less than top_p; the most likely one always stays.
        drop_sorted = (cum - sorted_scores.softmax(-1)) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, -float('inf'))
    return scores.softmax(-1).float()


def sample_next(log_probs, generator, temperature=1.0, top_k=0, top_p=1.0):
    """One token per row of [bsz, V] log-probabilities -> [bsz] long."""
    probs = next_token_probs(log_probs, temperature, top_k, top_p)
    if temperature == 0:
        return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------- the decoding loop

class Decoder:
    """Feeds tokens to a model in eval mode and returns the log-probabilities of the token that follows.

    With memory (model.mem_len > 0) each call runs only the new tokens, `chunk_len` at a time, and carries
    the memory forward. Without memory every call re-runs the last `chunk_len` tokens seen.
    """

    def __init__(self, model, chunk_len, kv_cache=True):
        if chunk_len < 1:
            raise ValueError(f'chunk length {chunk_len} must be at least 1')
        self.model = model.eval()
        self.chunk_len = chunk_len
        self.cached = model.mem_len > 0
        self.mems = model.init_mems() if self.cached else None
        self.history = None  # the recent tokens, for the no-memory fallback
        # Relative attention keeps the memory's keys and values (kv_cache=False: projects them again).
        self.kv_caches = new_kv_caches(model) if self.cached and kv_cache else {}

    @torch.no_grad()
    def feed(self, tokens):
        """tokens [n, bsz] (n >= 1) -> log-probabilities [bsz, n_token] of the next token."""
        if self.cached:
            with kv_caching(self.kv_caches):
                for chunk in tokens.split(self.chunk_len):
                    hidden, self.mems = self.model._forward(chunk, mems=self.mems)
        else:
            seen = tokens if self.history is None else torch.cat([self.history, tokens])
            self.history = seen[-self.chunk_len:]
            hidden, _ = self.model._forward(self.history, mems=None)
        return self.model.log_prob(hidden[-1])


def generate(model, prompt, max_tokens, generator, chunk_len, temperature=1.0, top_k=0, top_p=1.0):
    """Sample max_tokens tokens after prompt [len, bsz] -> [max_tokens, bsz] long."""
    decoder = Decoder(model, chunk_len)
    return torch.stack(list(iter_tokens(decoder, decoder.feed(prompt), max_tokens, generator, temperature, top_k,
                                        top_p)))


def iter_tokens(decoder, log_probs, max_tokens, generator, temperature=1.0, top_k=0, top_p=1.0):
    """Continue from a decoder that has seen the context and its next-token log_probs: max_tokens [bsz] tokens,
    one step at a time (a caller stopped halfway, by Ctrl-C, keeps the tokens it has)."""
    for step in range(max_tokens):
        token = sample_next(log_probs, generator, temperature, top_k, top_p)
        yield token
        if step + 1 < max_tokens:  # the last token needs no prediction after it
            log_probs = decoder.feed(token[None])


def bytes_per_sample(model, chunk_len, n_tokens):
    """About the most memory one continuation of n_tokens (prompt and new tokens) takes: its memory of hidden
    states and their keys and values, one chunk's attention scores and feed-forward activations, the sampling's
    float64 work on the next-token distribution, and the tokens themselves."""
    config, mem_len = model.config, model.mem_len
    n_layer, d_model = config['n_layer'], config['d_model']
    heads = config['n_head'] * config['d_head']
    state = 4 * mem_len * ((n_layer + 1) * d_model + 2 * n_layer * heads)
    chunk = 4 * chunk_len * (2 * (chunk_len + mem_len) * config['n_head'] + 2 * config['d_inner'] + 4 * d_model)
    return state + chunk + 40 * config['n_token'] + 16 * n_tokens


# ----------------------------------------------------------------------------- text <-> tokens

class TextCodec:
    """Prompt text -> token ids and ids -> text, for a dataset's vocabulary (utils.vocabulary.Vocab).

    enwik8: tokens are byte values written in decimal; a prompt is taken as UTF-8 bytes. Newlines are dropped,
            as in the corpus: the prepared files keep them as line breaks, which the tokenizer skips.
    text8:  tokens are characters, '_' standing for a space.
    chars:  tokens are characters, spaces and newlines included ('<unk>' reads as U+FFFD); an empty prompt starts
            at a line break.
    others: words split on whitespace (lower-cased where the vocabulary is), '<eos>' at every line end
            (lm1b: every line inside '<S>' ... '<S>'); output lines end at '<eos>' / '<S>'.
    Unknown prompt tokens become '<unk>' (lm1b: '<UNK>') when the vocabulary has it, otherwise they are an error.
    """

    def __init__(self, vocab, dataset):
        self.vocab = vocab
        self.dataset = dataset
        self.unk = next((s for s in ('<unk>', '<UNK>') if s in vocab.sym2idx), None)

    # -- encoding
    def symbols(self, text):
        if self.dataset == 'enwik8':
            newline = str(ord('\n'))
            syms = [str(b) for b in text.encode('utf-8')]
            return syms if newline in self.vocab.sym2idx else [s for s in syms if s != newline]
        if self.dataset == 'text8':
            return ['_' if c.isspace() else c for c in text]
        if self.dataset == 'chars':  # newlines as the corpus reads them
            return list(text.replace('\r\n', '\n').replace('\r', '\n') or '\n')
        return self._word_symbols(text)

    def _word_symbols(self, text):
        lm1b = self.dataset == 'lm1b'
        *full_lines, last = text.split('\n')
        syms = []
        for line in full_lines:
            syms += self.vocab.tokenize(line, add_eos=not lm1b, add_double_eos=lm1b)
        last_words = self.vocab.tokenize(last)
        if lm1b and (last_words or not syms):
            last_words = ['<S>'] + last_words  # an open sentence
        syms += last_words
        if not syms and '<eos>' in self.vocab.sym2idx:
            syms = ['<eos>']  # an empty prompt starts at a line boundary
        return syms

    def encode(self, text):
        """Prompt text -> list of ids; ConfigError naming the tokens the vocabulary lacks (without <unk>)."""
        syms = self.symbols(text)
        if not syms:
            raise ConfigError('the prompt is empty: give the text to continue (at least one character) with '
                              '--prompt TEXT or --prompt_file FILE')
        table = self.vocab.sym2idx
        missing = [s for s in syms if s not in table]
        if missing and self.unk is None:
            shown = ', '.join(self._describe(s) for s in dict.fromkeys(missing))
            raise ConfigError(f'the prompt has {len(missing)} token(s) that are not in the {self.dataset} vocabulary, '
                             f'which has no <unk>: {shown}')
        return [table.get(s, table.get(self.unk)) for s in syms]

    def _describe(self, sym):
        if self.dataset == 'enwik8':
            return f'byte {sym} ({bytes([int(sym)])!r})'
        return repr(sym)

    # -- decoding
    def decode(self, ids):
        syms = [self.vocab.get_sym(int(i)) for i in ids]
        if self.dataset == 'enwik8':
            return bytes(int(s) for s in syms).decode('utf-8', errors='replace')
        if self.dataset == 'text8':
            return ''.join(' ' if s == '_' else s for s in syms)
        if self.dataset == 'chars':
            return ''.join(map(self._char, syms))
        return self._join_words(syms)

    def _join_words(self, syms):
        lines, words = [], []
        for s in syms:
            if s == '<eos>' or (s == '<S>' and words):
                lines.append(' '.join(words) + '\n')
                words = []
            elif s != '<S>':  # a sentence-opening <S>
                words.append(s)
        return ''.join(lines) + ' '.join(words)

    def token_text(self, idx):
        """The text of one token (a byte value as a 1-byte string for enwik8)."""
        sym = self.vocab.get_sym(int(idx))
        if self.dataset == 'enwik8':
            return chr(int(sym))
        if self.dataset == 'chars':
            return self._char(sym)
        return ' ' if (self.dataset == 'text8' and sym == '_') else sym

    @staticmethod
    def _char(sym):
        return '\ufffd' if sym == '<unk>' else sym
