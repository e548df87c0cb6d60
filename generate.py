# coding: utf-8
"""Sample text from a trained model (WORK_DIR/model.pt or a checkpoint file), continuing a prompt.

The prompt is fed in segments of --tgt_len tokens, then every new token is fed alone with the segment memory of
everything before it (--mem_len hidden states per layer), so the context reaches far beyond the training segment.
The text (prompt as the model saw it, then the continuation) goes to stdout or --output; progress and the
speed in tokens/s go to stderr.

    python generate.py --work_dir runs/enwik8 --prompt "<title>Anarchism</title>" --max_tokens 300 --top_p 0.9
"""
import os
import signal
import sys
import time

import torch

from utils import files
from run.corpus import open_corpus
from run.evaluation import set_eval_lengths
from utils.exp_utils import OneLineArgumentParser, physical_memory, pick_device
from utils.errors import ConfigError, UserError
from utils.files import atomic_write
from run.generation import Decoder, TextCodec, bytes_per_sample, check_sampling, iter_tokens
from run.model_file import load_model, model_path


def build_parser():
    parser = OneLineArgumentParser(description='Sample text from a trained Transformer-XL')
    parser.add_argument('--work_dir', type=str, required=True,
                        help='run directory (its model.pt is used) or a checkpoint file of this project')
    parser.add_argument('--data', type=str, default=None,
                        help='location of the data corpus, for the vocabulary (default: the one the model was '
                             'trained on)')
    parser.add_argument('--dataset', type=str, default=None,
                        help='dataset name (default: the one the model was trained on)')
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument('--prompt', type=str, default='', help='text to continue')
    prompt.add_argument('--prompt_file', type=str, default=None, help='file (UTF-8) holding the text to continue')
    parser.add_argument('--max_tokens', type=int, default=200, help='number of tokens to generate')
    parser.add_argument('--temperature', type=float, default=1.0,
                        help='divides the log-probabilities; 0 = always the most likely token')
    parser.add_argument('--top_k', type=int, default=0, help='sample among the k most likely tokens (0 = all)')
    parser.add_argument('--top_p', type=float, default=1.0,
                        help='sample among the most likely tokens that hold this much probability (1 = all)')
    parser.add_argument('--seed', type=int, default=1111, help='random seed: the same seed gives the same text')
    parser.add_argument('--num_samples', type=int, default=1, help='independent continuations, run as a batch')
    parser.add_argument('--tgt_len', type=int, default=None,
                        help='segment length for feeding the prompt (default: the training tgt_len)')
    parser.add_argument('--mem_len', type=int, default=None,
                        help='hidden states kept per layer (default: the training mem_len); 0 re-runs the last '
                             'tgt_len tokens at every step instead')
    parser.add_argument('--clamp_len', type=int, default=-1, help='max positional embedding index')
    parser.add_argument('--same_length', action='store_true', help='set same length attention with masking')
    parser.add_argument('--cuda', action='store_true', help='use CUDA')
    parser.add_argument('--threads', type=int, default=0,
                        help='CPU threads (default: torch\'s choice); one-token steps are small products, and one '
                             'thread is often fastest, especially on a busy machine')
    parser.add_argument('--output', type=str, default=None, help='write the text to this file instead of stdout')
    return parser


def check_args(args):
    for name in ('max_tokens', 'num_samples'):
        if getattr(args, name) < 1:
            raise ConfigError(f'--{name} {getattr(args, name)} must be at least 1')
    cpus = os.cpu_count() or 1
    if not 0 <= args.threads <= cpus:
        raise ConfigError(f'--threads {args.threads} must be between 0 (torch\'s choice) and this machine\'s '
                          f'{cpus} CPUs')
    if not -2 ** 63 <= args.seed < 2 ** 64:
        raise ConfigError(f'--seed {args.seed} must be between -2**63 and 2**64 - 1')
    for name, low in (('tgt_len', 1), ('mem_len', 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ConfigError(f'--{name} {value} must be at least {low}')
    check_sampling(args.temperature, args.top_k, args.top_p)
    if not os.path.exists(args.work_dir):
        raise ConfigError(f'--work_dir {args.work_dir} does not exist')
    if args.prompt_file is not None and os.path.isdir(args.prompt_file):
        raise ConfigError(f'--prompt_file {args.prompt_file} is a directory: give the file holding the prompt')
    if args.prompt_file is not None and not os.path.isfile(args.prompt_file):
        raise ConfigError(f'--prompt_file {args.prompt_file} does not exist')
    if args.output is not None:
        files.check_output_file(args.output, '--output')


def read_prompt(args):
    if args.prompt_file is None:
        return args.prompt
    try:
        with open(args.prompt_file, encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError:
        raise ConfigError(f'--prompt_file {args.prompt_file} is not UTF-8 text') from None


def check_memory(args, model, tgt_len, prompt_len, device):
    """--num_samples run as one batch: refused when the batch (and its --max_tokens) cannot fit in the device's
    memory."""
    need = args.num_samples * bytes_per_sample(model, tgt_len, prompt_len + args.max_tokens)
    if device.type == 'cuda':
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = physical_memory()
    if need > have:
        raise ConfigError(f'--num_samples {args.num_samples} of --max_tokens {args.max_tokens} need about '
                          f'{need / 2 ** 30:,.1f} GiB, more than the {have / 2 ** 30:,.1f} GiB of {device.type}: '
                          'generate fewer or shorter samples at once (another --seed gives others)')


def write_text(text, output):
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_write(output) as f:
        f.write(text)


def main(argv=None):
    args = build_parser().parse_args(argv)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 - stdout is for the text
    try:
        check_args(args)
        prompt_text = read_prompt(args)
        device = pick_device(args.cuda, log)
        path = model_path(args.work_dir)
        model, saved = load_model(path, device)
        tgt_len, mem_len = set_eval_lengths(model, args.tgt_len, args.mem_len, 0, args.clamp_len, args.same_length)
        corpus, dataset, _ = open_corpus(saved, path, model.n_token, args.data, args.dataset, log=log)
        codec = TextCodec(corpus.vocab, dataset)
        prompt_ids = codec.encode(prompt_text)
        check_memory(args, model, tgt_len, len(prompt_ids), device)
    except (UserError, OSError) as e:  # bad input, or the file system's refusal
        print(f'generate.py: error: {e}', file=sys.stderr)
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)[:, None].repeat(1, args.num_samples)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    memory = (f'memory of {mem_len} states per layer' if mem_len > 0
              else f'no memory: every step re-runs the last {tgt_len} tokens')
    log(f'Generating {args.max_tokens} tokens x {args.num_samples} after a prompt of {len(prompt_ids)} tokens '
        f'({memory}; temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}, seed {args.seed})')

    def synchronize():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    start = prompt_done = time.perf_counter()
    tokens = []   # Ctrl-C stops the generation: the text so far is written, then the exit code says so
    try:
        decoder = Decoder(model, tgt_len)
        log_probs = decoder.feed(prompt)
        synchronize()
        prompt_done = time.perf_counter()
        for token in iter_tokens(decoder, log_probs, args.max_tokens, generator, args.temperature, args.top_k,
                                 args.top_p):
            tokens.append(token)
        synchronize()
        interrupted = False
    except KeyboardInterrupt:
        log(f'Interrupted after {len(tokens)} of {args.max_tokens} tokens: writing the text so far')
        interrupted = True
    sampling = time.perf_counter() - prompt_done

    new_ids = torch.stack(tokens).T.tolist() if tokens else [[]] * args.num_samples
    samples = [codec.decode(prompt_ids + ids) for ids in new_ids]
    if args.num_samples == 1:
        text = samples[0] + '\n'
    else:
        text = ''.join(f'=== sample {i + 1} ===\n{s}\n' for i, s in enumerate(samples))
    try:
        write_text(text, args.output)
    except files.WriteError as e:  # a disk that filled up while generating
        print(f'generate.py: error: {e}', file=sys.stderr)
        return 2
    n_new = len(tokens) * args.num_samples
    log(f'| prompt {len(prompt_ids)} tokens in {prompt_done - start:.2f}s | generated {n_new} tokens in '
        f'{sampling:.2f}s, {n_new / max(sampling, 1e-9):.1f} tokens/s |'
        + (f' wrote {args.output}' if args.output else ''))
    return 128 + signal.SIGINT if interrupted else 0


if __name__ == '__main__':
    sys.exit(main())
