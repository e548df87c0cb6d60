"""How the benchmark figures read, for the scripts that print them and for run_all.py's report: the MoE
layer's speed targets, each with its measured figure and whether it holds, and the bf16 loss check's lines."""
import importlib.metadata
import re

from timing import SAMPLE

# Row (b) needs transformers' Mixtral as transformers 5 has it: MixtralExperts, whose implementation is chosen from
# transformers.integrations.moe's ALL_EXPERTS_FUNCTIONS ('grouped_mm', 'eager'). The 4.x releases have neither,
# and 5.0 removed the Transformer-XL classes the test suite compares with (requirements-test.txt pins 4.35.2),
# so the two live in separate virtual environments.
MIXTRAL_NEEDS = ("transformers 5.0 or later (MixtralExperts with the 'grouped_mm' experts implementation; "
                 'bench/README.md measured 5.24.0)')

TARGETS = ((64, 'vs_dense', 1.5, '<='), (64, 'loop_speedup', 10.0, '>='), (8, 'vs_dense', 1.3, '<='),
           (8, 'vs_mixtral', 1.0, '<='), (64, 'vs_mixtral', 1.0, '<='))
TARGET_WHAT = {'vs_dense': 'time / dense', 'loop_speedup': 'loop time / moe time',
               'vs_mixtral': "time / transformers' grouped_mm Mixtral experts"}


# A ratio whose repeats (each a paired ratio, both variants timed in the same repeat) spread wider than this
# factor is printed with their range: its median is as much the machine's load as the code.
NOISY = 1.25


def ratio_text(value, spread=None, invert=False):
    """A ratio as the reports print it, with its repeats' range where they disagree. invert: 1 / the ratio."""
    if invert:
        value, spread = 1 / value, spread and [1 / spread[1], 1 / spread[0]]
    text = f'{value:.2f}'
    if spread and spread[1] > NOISY * spread[0]:
        text += f' (noisy: repeats {spread[0]:.2f}-{spread[1]:.2f})'
    return text


def verdict(value, bound, op, spread=None, quick=False):
    """Whether a target holds; not judged on a --quick run, unclear where the repeats fall on both sides."""
    if quick:
        return 'not judged (--quick)'

    def holds(x):
        return x <= bound if op == '<=' else x >= bound
    if spread and holds(spread[0]) != holds(spread[1]):
        return f'UNCLEAR: its repeats gave {spread[0]:.2f}-{spread[1]:.2f}, on both sides of the target'
    return 'holds' if holds(value) else 'MISSED'


def moe_target_lines(rows, quick=False):
    lines = []
    for row in rows:
        if row['variant'] != 'moe':
            continue
        for experts, key, bound, op in TARGETS:
            if row['experts'] == experts and row.get(key) is not None:
                spread = row.get(f'{key}_range')
                lines.append(f"{experts:>3} experts {row['dtype']}: {TARGET_WHAT[key]} = "
                             f"{ratio_text(row[key], spread)} (target {op} {bound}) "
                             f"{verdict(row[key], bound, op, spread, quick)}")
    return lines


def print_loss_check(check):
    if check is None:
        print(f'bf16 loss check skipped: {SAMPLE} not found')
        return
    print(f"bf16 vs fp32 on the enwik8 sample, {check['config']}, {check['steps']} steps "
          f"(loss at step 1: {check['first_loss']:.3f} nats):")
    for what in ('train', 'heldout'):
        loss = check[f'{what}_loss']
        label = f"mean training loss of the last {check['last']} steps" if what == 'train' \
            else 'held-out loss (fp32 evaluation)'
        print(f"  {label}: fp32 {loss['fp32']:.4f}, bf16 {loss['bf16']:.4f}, "
              f"relative difference {100 * check[f'{what}_rel_diff']:.2f}%")


def transformers_version():
    """The installed transformers' version, or None."""
    try:
        return importlib.metadata.version('transformers')
    except importlib.metadata.PackageNotFoundError:
        return None


def mixtral_skipped(version):
    """Why the Mixtral rows (b) did not run, given the transformers version installed then (None: none)."""
    if version is None:
        return f'transformers is not installed; they need {MIXTRAL_NEEDS}'
    major = re.match(r'\d+', version)
    if major and int(major.group()) < 5:
        return (f'transformers {version} is installed, but they need {MIXTRAL_NEEDS}; 5.0 removed the '
                f'Transformer-XL that tests/test_hf_transfo_xl.py compares with {version}, so install it in a '
                'virtual environment of its own (pip install "transformers>=5")')
    return f'transformers {version} has no grouped_mm Mixtral experts; they need {MIXTRAL_NEEDS}'
