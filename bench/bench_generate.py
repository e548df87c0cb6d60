"""Benchmark of generation: one decoding step with the segment memory against re-running the context.

For a context of L tokens, the next token's log-probabilities come either from
  cached     one token fed with the memory of the L tokens before it and each layer's keys and values of
             that memory (what generate.py does)
  no-KV      the same step projecting the memory to keys and values again (Decoder(kv_cache=False))
  recompute  a forward pass over all L + 1 tokens without memory (what a model without a cache must do)
All give the same distribution when the memory holds the whole context (tested in tests/test_generate.py);
the cached step attends over L + 1 keys for one query, the recompute over (L + 1)^2. The variants are timed
in every repeat, alternately, so machine load affects them alike; figures are medians after warm-up, batch 1,
eval mode, fp32, on the CPU-sized configuration of the speed suite (4 layers, d_model 256, 4 heads of 64,
d_inner 1024, character vocabulary 204), dense and MoE (16 experts, top-2, d_inner 512 each). The last rows
time generate() end to end (prompt of 128 tokens, then sampling with top_p 0.9) with mem_len 512.

    python bench/bench_generate.py [--contexts 128 512 2048] [--repeats 7] [--threads N] [--json bench_generate.json]

bench/run_all.py can call run(...) -> dict (the rows) or main(argv).
"""
import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from mem_transformer import MemTransformerLM, init_weights  # noqa: E402
from run.generation import Decoder, generate  # noqa: E402

N_TOKEN = 204
MODELS = {
    'dense': dict(moe=False, d_inner=1024),
    'moe16': dict(moe=True, moe_num_expert=16, moe_top_k=2, d_inner=512),
}


def build(name, mem_len):
    torch.manual_seed(0)
    model = MemTransformerLM(N_TOKEN, 4, 4, 256, 64, dropout=0.0, dropatt=0.0, tgt_len=128, ext_len=0,
                             mem_len=mem_len, **MODELS[name])
    return init_weights(model).eval()


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def step_times(model, context_len, repeats, warmup):
    """Median seconds of a decoding step with a full memory of context_len states, with and without the
    key/value cache, and of a full recompute of context_len + 1 tokens."""
    tokens = torch.randint(0, N_TOKEN, (context_len + 1, 1), generator=torch.Generator().manual_seed(0))
    model.reset_length(128, 0, context_len)
    steps = {}
    for name, kv_cache in (('cached', True), ('no_kv_cache', False)):
        decoder = Decoder(model, chunk_len=128, kv_cache=kv_cache)
        decoder.feed(tokens[:context_len])  # the memory is full from here on; every step slides it by one
        steps[name] = functools.partial(decoder.feed, tokens[context_len:])

    def recompute():
        hidden, _ = model._forward(tokens, mems=None)
        model.log_prob(hidden[-1])
    steps['recompute'] = recompute

    times = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, fn in steps.items():
            t = timed(fn)
            if i >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def generation_rate(model, n_tokens, mem_len):
    model.reset_length(128, 0, mem_len)
    prompt = torch.randint(0, N_TOKEN, (128, 1), generator=torch.Generator().manual_seed(0))
    generate(model, prompt, 8, torch.Generator().manual_seed(0), 128)  # warm-up
    elapsed = timed(lambda: generate(model, prompt, n_tokens, torch.Generator().manual_seed(0), 128, top_p=0.9))
    return n_tokens / elapsed


def run(contexts=(128, 512, 2048), repeats=7, warmup=2, models=tuple(MODELS), gen_tokens=128, mem_len=512):
    """The benchmark's figures: {'steps': [...], 'generate': [...], 'threads': N}."""
    steps, rates = [], []
    for name in models:
        model = build(name, mem_len)
        for context_len in contexts:
            t = step_times(model, context_len, repeats, warmup)
            steps.append({'model': name, 'context': context_len, 'cached_ms': 1000 * t['cached'],
                          'no_kv_cache_ms': 1000 * t['no_kv_cache'],
                          'recompute_ms': 1000 * t['recompute'], 'cached_tokens_per_s': 1 / t['cached'],
                          'recompute_tokens_per_s': 1 / t['recompute'], 'speedup': t['recompute'] / t['cached']})
        rates.append({'model': name, 'mem_len': mem_len, 'tokens': gen_tokens,
                      'tokens_per_s': generation_rate(model, gen_tokens, mem_len)})
    return {'steps': steps, 'generate': rates, 'threads': torch.get_num_threads()}


def format_results(results):
    lines = [f'Generation step, batch 1, fp32, {results["threads"]} threads (median):',
             f'{"model":<7} {"context":>7} {"cached ms":>10} {"no-KV ms":>9} {"recompute ms":>13} '
             f'{"cached tok/s":>13} {"recompute tok/s":>16} {"speed-up":>9}']
    for r in results['steps']:
        lines.append(f'{r["model"]:<7} {r["context"]:>7} {r["cached_ms"]:>10.2f} {r["no_kv_cache_ms"]:>9.2f} '
                     f'{r["recompute_ms"]:>13.2f} '
                     f'{r["cached_tokens_per_s"]:>13.1f} {r["recompute_tokens_per_s"]:>16.1f} '
                     f'{r["speedup"]:>8.1f}x')
    for r in results['generate']:
        lines.append(f'generate() {r["model"]}: {r["tokens"]} tokens after a 128-token prompt, mem_len '
                     f'{r["mem_len"]}: {r["tokens_per_s"]:.1f} tokens/s')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--contexts', type=int, nargs='+', default=[128, 512, 2048], help='context lengths L')
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    p.add_argument('--json', help='also write the figures to this JSON file')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(tuple(args.contexts), args.repeats, args.warmup, tuple(args.models))
    print(format_results(results))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
        print(f'wrote {args.json}')
    return results


if __name__ == '__main__':
    main()
