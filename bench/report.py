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

# The MoE layer's targets, in every cell (shape, experts, dtype): its time within these factors of its floor (the
# expert products alone); bf16 leaves more to the rest of the layer (the fp32 gradients of the expert weights, cast
# from the products' bf16, which the floor does not make, and once per step the weights' cast). Its time and peak
# memory at most those of transformers' grouped_mm Mixtral experts.
FLOOR_BOUND = {'fp32': 1.10, 'bf16': 1.20}


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
    """The MoE layer's target lines, cell by cell: 'moe' (and in bf16 'moe-stepped', which casts its weights at
    every step as training does) against the floor; 'moe' against the Mixtral experts, in time and peak memory."""
    lines, by_cell = [], {(r.get('shape', ''), r['experts'], r['dtype'], r['variant']): r for r in rows}
    for (shape, experts, dtype, variant), r in by_cell.items():
        if variant not in ('moe', 'moe-stepped') or (variant, dtype) == ('moe-stepped', 'fp32'):
            continue   # in fp32 there is no copy to make: moe-stepped is moe
        cell = f"{experts:>3} experts {dtype}" + (f", {shape}" if shape else '') + f", {variant}"
        if r.get('vs_floor') is not None:
            bound, spread = FLOOR_BOUND[dtype], r.get('vs_floor_range')
            lines.append(f"{cell}: time / floor = {ratio_text(r['vs_floor'], spread)} (target <= {bound}) "
                         f"{verdict(r['vs_floor'], bound, '<=', spread, quick)}")
        peer = by_cell.get((shape, experts, dtype, 'mixtral-grouped_mm'))
        if variant != 'moe' or peer is None:
            continue
        spread = r.get('vs_mixtral_range')
        lines.append(f"{cell}: time / transformers' grouped_mm Mixtral experts = "
                     f"{ratio_text(r['vs_mixtral'], spread)} (target <= 1.0) "
                     f"{verdict(r['vs_mixtral'], 1.0, '<=', spread, quick)}")
        if None not in (r.get('peak_mib'), peer.get('peak_mib')):
            lines.append(f"{cell}: peak MiB {r['peak_mib']:.1f} vs the Mixtral experts' {peer['peak_mib']:.1f} "
                         f"(target <=) {verdict(r['peak_mib'] / peer['peak_mib'], 1.0, '<=', quick=quick)}")
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
