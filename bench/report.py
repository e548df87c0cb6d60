"""How the benchmark figures read, for the scripts that print them and for run_all.py's report: the MoE
layer's speed targets, each with its measured figure and whether it holds, and the bf16 loss check's lines."""
from timing import SAMPLE

TARGETS = ((64, 'vs_dense', 1.5, '<='), (64, 'loop_speedup', 10.0, '>='), (8, 'vs_dense', 1.3, '<='),
           (8, 'vs_mixtral', 1.0, '<='), (64, 'vs_mixtral', 1.0, '<='))
TARGET_WHAT = {'vs_dense': 'time / dense', 'loop_speedup': 'loop time / moe time',
               'vs_mixtral': "time / transformers' grouped_mm Mixtral experts"}


def moe_target_lines(rows):
    lines = []
    for row in rows:
        if row['variant'] != 'moe':
            continue
        for experts, key, bound, op in TARGETS:
            if row['experts'] == experts and row.get(key) is not None:
                ok = row[key] <= bound if op == '<=' else row[key] >= bound
                lines.append(f"{experts:>3} experts {row['dtype']}: {TARGET_WHAT[key]} = {row[key]:.2f} "
                             f"(target {op} {bound}) {'holds' if ok else 'MISSED'}")
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
