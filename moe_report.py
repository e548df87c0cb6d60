# coding: utf-8
"""What the router learned: per MoE layer and expert, over a data split.

Runs the model over the split as eval.py does (memory carried across segments) and records every token's routing
with a forward hook on each layer's gate (moe.py's gates return the chosen experts, -1 where a capacity limit
dropped the copy, and their scores). Reports, per layer:
  share       fraction of the routed token copies (a token counts top_k times) that went to each expert
  confidence  mean gate score of the copies an expert received (the weight of its output in the mixture), and
              per layer the mean score of each token's best expert
  imbalance   max/mean and coefficient of variation (std/mean) of the experts' copy counts
  dropped     copies dropped by the capacity limit of the gshard/switch gates (and their fraction)
  classes     for enwik8/text8: which byte classes (letters, digits, whitespace, markup, punctuation, non-ASCII)
              an expert's tokens are, its most frequent class, and the class most over-represented (lift)
as a table on stdout, JSON (moe_report.json) and a PNG (moe_report.png) next to the model: the shares (white at an
even share, red above, blue below) and confidences as heat maps with their numbers, and per layer the byte classes
of each expert's tokens.

    python moe_report.py --work_dir runs/enwik8-moe --split valid
"""
import json
import os
import sys

import numpy as np
import torch

from data_utils import CHAR_LEVEL
from utils import files
from run.corpus import open_corpus
from run.evaluation import evaluate, set_eval_lengths
from utils.exp_utils import OneLineArgumentParser, format_loss, pick_device
from utils.errors import CheckpointError, ConfigError, UserError
from utils.files import atomic_write
from utils.plots import DIVERGING, centred_norm, colour_bar, label_cells, label_every_tick, plt, save  # Agg
from run.generation import TextCodec
from run.model_file import load_model, model_path

BYTE_CLASSES = ('letters', 'digits', 'whitespace', 'markup', 'punctuation', 'non-ASCII')
MARKUP = set('<>[]{}|=&;#*/')  # XML tags and entities, wiki links, templates, tables, lists


def byte_class(char):
    """Index in BYTE_CLASSES of one character (a byte value below 256 as chr for enwik8)."""
    if ord(char) >= 128:
        return 5
    if char.isalpha():
        return 0
    if char.isdigit():
        return 1
    if char.isspace():
        return 2
    return 3 if char in MARKUP else 4


def token_classes(codec):
    """[n_token] long: the byte class of every token of a character-level vocabulary."""
    return torch.tensor([byte_class(codec.token_text(i)) for i in range(len(codec.vocab))], dtype=torch.long)


class LayerRouting:
    """Running counts of one MoE layer's routing decisions."""

    def __init__(self, num_expert, top_k, n_classes):
        self.num_expert, self.top_k, self.n_classes = num_expert, top_k, n_classes
        self.tokens = 0
        self.dropped = 0
        self.routed_tokens = 0   # tokens with at least one copy kept
        self.top_score_sum = 0.0  # their best copy's score
        self.copies = torch.zeros(num_expert, dtype=torch.float64)
        self.score_sum = torch.zeros(num_expert, dtype=torch.float64)
        self.class_copies = torch.zeros(num_expert, max(n_classes, 1), dtype=torch.float64)

    def add(self, expert, score, token_class=None):
        """expert, score [N, k] (expert -1 = dropped); token_class [N] or None."""
        expert, score = expert.detach().cpu(), score.detach().cpu().double()
        kept = expert >= 0
        chosen = expert[kept]
        self.tokens += expert.size(0)
        self.dropped += int((~kept).sum())
        best = score.masked_fill(~kept, -1.0).max(1).values
        self.routed_tokens += int((best >= 0).sum())
        self.top_score_sum += float(best[best >= 0].sum())
        self.copies += torch.bincount(chosen, minlength=self.num_expert).double()
        self.score_sum += torch.bincount(chosen, weights=score[kept], minlength=self.num_expert)
        if token_class is not None:
            cls = token_class.cpu()[:, None].expand_as(expert)[kept]
            pair = torch.bincount(chosen * self.n_classes + cls, minlength=self.num_expert * self.n_classes)
            self.class_copies += pair.view(self.num_expert, self.n_classes).double()

    def summary(self, class_names=()):
        copies = self.copies
        total = float(copies.sum())
        mean = total / self.num_expert
        std = float(((copies - mean) ** 2).mean().sqrt())
        conf = [float(s / c) if c > 0 else None for s, c in zip(self.score_sum, copies)]
        out = {
            'num_expert': self.num_expert, 'top_k': self.top_k, 'tokens': self.tokens, 'copies': int(total),
            'share': [float(c / total) if total else 0.0 for c in copies],
            'confidence': conf,
            'mean_top_score': self.top_score_sum / self.routed_tokens if self.routed_tokens else None,
            'max_over_mean': float(copies.max() / mean) if mean else None,
            'cv': std / mean if mean else None,
            'dropped': self.dropped,
            'dropped_fraction': self.dropped / (self.tokens * self.top_k) if self.tokens else 0.0,
        }
        if class_names:
            out.update(self._classes(class_names))
        return out

    def _classes(self, names):
        per_expert = self.class_copies
        overall = per_expert.sum(0) / per_expert.sum().clamp(min=1)
        share = per_expert / per_expert.sum(1, keepdim=True).clamp(min=1)
        lift = torch.where(overall > 0, share / overall.clamp(min=1e-12), torch.zeros_like(share))
        empty = per_expert.sum(1) == 0
        return {
            'classes': list(names),
            'class_share': share.tolist(),
            'top_class': [None if e else names[int(i)] for e, i in zip(empty, share.argmax(1))],
            'most_over_represented': [None if e else names[int(i)] for e, i in zip(empty, lift.argmax(1))],
            'class_lift': lift.tolist(),
        }


class RoutingRecorder:
    """Forward hooks that feed every MoE layer's routing into a LayerRouting, with the tokens' classes."""

    def __init__(self, model, classes_of_token=None):
        self.layers = model.moe_layers()
        if not self.layers:
            raise CheckpointError('the model has no MoE layers (it was trained without --moe): nothing to report')
        self.classes_of_token = classes_of_token
        n_classes = len(BYTE_CLASSES) if classes_of_token is not None else 0
        self.routing = [LayerRouting(ff.num_expert, ff.top_k, n_classes) for ff in self.layers]
        self.token_class = None
        self.handles = [model.register_forward_pre_hook(self._see_tokens)]
        for ff, stats in zip(self.layers, self.routing):
            self.handles.append(ff.gate.register_forward_hook(self._gate_hook(stats)))

    def _see_tokens(self, module, args):
        # A gate sees the layer input flattened as [qlen * bsz, d_model]: the order of data.reshape(-1).
        data = args[0]
        if self.classes_of_token is not None:
            self.token_class = self.classes_of_token.to(data.device)[data.reshape(-1)]

    def _gate_hook(self, stats):
        def hook(gate, inputs, routing):
            expert, score = routing[0], routing[1]
            stats.add(expert, score, self.token_class)
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def summary(self):
        names = BYTE_CLASSES if self.classes_of_token is not None else ()
        return [dict(layer=i, gate=ff.gate_type, **stats.summary(names))
                for i, (ff, stats) in enumerate(zip(self.layers, self.routing))]


# ----------------------------------------------------------------------------- output

def _fmt(value, spec):
    return '-' if value is None else format(value, spec)


def format_table(layers):
    lines = []
    for layer in layers:
        lines.append(f'layer {layer["layer"]}: {layer["num_expert"]} experts, top-{layer["top_k"]} {layer["gate"]} '
                     f'gate, {layer["tokens"]} tokens | imbalance max/mean {_fmt(layer["max_over_mean"], ".2f")}, '
                     f'CV {_fmt(layer["cv"], ".2f")} | mean top-1 score {_fmt(layer["mean_top_score"], ".3f")} | '
                     f'dropped {layer["dropped"]} ({100 * layer["dropped_fraction"]:.2f}%)')
        classes = 'classes' in layer
        header = '  expert   share   confidence' + ('   top class (share)        most over-represented (lift)'
                                                    if classes else '')
        lines.append(header)
        for e in range(layer['num_expert']):
            row = f'  {e:>6} {100 * layer["share"][e]:6.2f}%   {_fmt(layer["confidence"][e], ".3f"):>10}'
            if classes and layer['top_class'][e] is not None:
                top, over = layer['classes'].index(layer['top_class'][e]), \
                    layer['classes'].index(layer['most_over_represented'][e])
                row += (f'   {layer["top_class"][e]:<11} ({100 * layer["class_share"][e][top]:5.1f}%)'
                        f'      {layer["most_over_represented"][e]:<11} (x{layer["class_lift"][e][over]:.2f})')
            lines.append(row)
    return '\n'.join(lines)


def write_json(report, path):
    with atomic_write(path) as f:
        json.dump(report, f, indent=1)


def expert_matrix(layers, key, scale=1.0):
    """[n_expert, n_layer]: one value per expert (rows) and layer (columns), NaN where there is none."""
    n_expert = max(layer['num_expert'] for layer in layers)
    out = np.full((n_expert, len(layers)), np.nan)
    for col, layer in enumerate(layers):
        for e, value in enumerate(layer[key]):
            out[e, col] = np.nan if value is None else scale * value
    return out


def heat_map(ax, colour, numbers, cmap, norm, fmt):
    """A heat map of colour [experts, columns] with numbers written in its cells, every expert labelled."""
    image = ax.imshow(colour, aspect='auto', interpolation='nearest', cmap=cmap, norm=norm)
    n_expert = colour.shape[0]
    label_cells(ax, image, numbers, fmt, fontsize=7 if n_expert <= 16 else 6 if n_expert <= 32 else 4)
    label_every_tick(ax, 'y', n_expert)
    ax.set_ylabel('expert')
    return image


def routing_figure(layers, title):
    """Per layer and expert: the share of the routed tokens (white at an even share, red above, blue below, the
    percentage in each cell) and the mean gate score; for character-level corpora, per layer, the byte classes of
    each expert's tokens (% of its tokens in each cell, coloured by how over-represented the class is there)."""
    classes = 'classes' in layers[0]
    n_expert, n_layer = max(layer['num_expert'] for layer in layers), len(layers)
    block = 1.6 + (0.3 if n_expert <= 16 else 0.2 if n_expert <= 32 else 0.14) * n_expert
    n_col = min(n_layer, 4)
    n_row = -(-n_layer // n_col) if classes else 0
    fig = plt.figure(layout='constrained', figsize=(max(2 * (2.5 + 0.75 * n_layer), 5.5 * n_col if classes else 0),
                                                    block * (1 + n_row) + 0.6))
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, max(n_row, 1)]) if classes else (fig, None)
    share_ax, score_ax = top.subplots(1, 2)

    # coloured as a multiple of the layer's even share, so that white is even whatever the number of experts
    even = expert_matrix(layers, 'share') * np.array([layer['num_expert'] for layer in layers])
    image = heat_map(share_ax, even, expert_matrix(layers, 'share', 100), DIVERGING,
                     centred_norm(1.0, np.nanmax(even)), '.1f')
    even_text = ', '.join(sorted({f'{100 / layer["num_expert"]:.3g}%' for layer in layers}))
    share_ax.set_title(f'% of the routed tokens (even share: {even_text})', fontsize=10)
    colour_bar(top, image, even, share_ax, 'share / even share (1 = even)')
    confidence = expert_matrix(layers, 'confidence')
    image = heat_map(score_ax, confidence, confidence, 'viridis', None, '.2f')
    score_ax.set_title('mean gate score of the tokens each expert got', fontsize=10)
    top.colorbar(image, ax=score_ax, label='mean gate score')
    dropped = any(layer['dropped'] for layer in layers)
    layer_names = [f'{layer["layer"]}\n{layer["max_over_mean"] or 0:.2f}' +
                   (f'\n{100 * layer["dropped_fraction"]:.1f}%' if dropped else '') for layer in layers]
    for ax in (share_ax, score_ax):
        ax.set_xticks(range(n_layer), layer_names, fontsize=8)
        ax.set_xlabel('layer\nits load max/mean' + ('\ncopies dropped' if dropped else ''), fontsize=8)

    if classes:
        axes = bottom.subplots(n_row, n_col, squeeze=False)
        lifts = np.array([layer['class_lift'] for layer in layers])
        norm = centred_norm(1.0, lifts.max())
        for layer, ax in zip(layers, axes.flat):
            image = heat_map(ax, np.array(layer['class_lift']), 100 * np.array(layer['class_share']), DIVERGING,
                             norm, '.0f')
            ax.set_xticks(range(len(layer['classes'])), [f'{name}\n{100 * share:.0f}% of all' for name, share
                                                          in zip(layer['classes'], class_overall(layer))], fontsize=7)
            ax.set_title(f"layer {layer['layer']}", fontsize=10)
        for ax in axes.flat[n_layer:]:
            ax.set_visible(False)
        colour_bar(bottom, image, lifts, axes.ravel().tolist(), 'lift (1 = as in the text)', aspect=20 * n_row)
        bottom.suptitle("Byte classes: % of each expert's tokens in each class; colour: lift, that % / the class's "
                        '% of all tokens (white: as in the text, red: over-represented, blue: under)', fontsize=10)
    fig.suptitle(title)
    return fig


def class_overall(layer):
    """Each byte class's share of all the layer's routed copies (the share every expert would have without
    specialisation), from the experts' token shares and class shares."""
    per_expert = np.array(layer['share'])[:, None] * np.array(layer['class_share'])
    return per_expert.sum(0)


def write_heatmap(layers, path, title):
    save(routing_figure(layers, title), path)


# ----------------------------------------------------------------------------- command line

def build_parser():
    parser = OneLineArgumentParser(description='Expert-routing report of a Mixture-of-Experts Transformer-XL')
    parser.add_argument('--work_dir', type=str, required=True,
                        help='run directory (its model.pt is used) or a checkpoint file of this project')
    parser.add_argument('--data', type=str, default=None,
                        help='location of the data corpus (default: the one the model was trained on)')
    parser.add_argument('--dataset', type=str, default=None,
                        help='dataset name (default: the one the model was trained on)')
    parser.add_argument('--split', type=str, default='valid', choices=['train', 'valid', 'test'])
    parser.add_argument('--batch_size', type=int, default=10, help='batch size')
    parser.add_argument('--tgt_len', type=int, default=None, help='segment length (default: the training one)')
    parser.add_argument('--mem_len', type=int, default=None, help='memory length (default: the training one)')
    parser.add_argument('--max_segments', type=int, default=0, help='stop after this many segments (0 = all)')
    parser.add_argument('--cuda', action='store_true', help='use CUDA')
    parser.add_argument('--json', type=str, default=None, help='JSON output (default: moe_report.json next to '
                                                               'the model)')
    parser.add_argument('--png', type=str, default=None, help='heat map (default: moe_report.png next to the '
                                                              'model)')
    return parser


def check_args(args):
    for name in ('batch_size', 'tgt_len'):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f'--{name} {value} must be at least 1')
    for name in ('mem_len', 'max_segments'):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ConfigError(f'--{name} {value} must be non-negative')
    if not os.path.exists(args.work_dir):
        raise ConfigError(f'--work_dir {args.work_dir} does not exist')
    for name in ('json', 'png'):  # where the report goes, checked before the work
        files.check_output_file(output_path(args, name), f'--{name}')


def output_path(args, name):
    """--json/--png, or moe_report.json/.png next to the model."""
    return getattr(args, name) or os.path.join(os.path.dirname(model_path(args.work_dir)), f'moe_report.{name}')


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        device = pick_device(args.cuda, print)
        path = model_path(args.work_dir)
        model, saved = load_model(path, device)
        if not model.moe_layers():
            raise CheckpointError(f'the model in {path} has no MoE layers (trained without --moe): nothing to report')
        corpus, dataset, data = open_corpus(saved, path, model.n_token, args.data, args.dataset,
                                            log=lambda line: print(line, file=sys.stderr))  # stdout: the report
        tgt_len, mem_len = set_eval_lengths(model, args.tgt_len, args.mem_len)
        split_iter = corpus.get_iterator(args.split, args.batch_size, tgt_len, device=device, ext_len=0)
    except (UserError, OSError) as e:  # bad input, or the file system's refusal
        print(f'moe_report.py: error: {e}', file=sys.stderr)
        return 2

    classes = token_classes(TextCodec(corpus.vocab, dataset)) if dataset in CHAR_LEVEL else None
    recorder = RoutingRecorder(model, classes)
    try:
        loss, n_segments = evaluate(model, split_iter, max_steps=args.max_segments)
    except UserError as e:
        print(f'moe_report.py: error: {args.split} split of {data}: {e}', file=sys.stderr)
        return 2
    finally:
        recorder.remove()

    layers = recorder.summary()
    report = {'checkpoint': os.path.abspath(path), 'dataset': dataset, 'data': data, 'split': args.split,
              'segments': n_segments, 'batch_size': args.batch_size, 'tgt_len': tgt_len, 'mem_len': mem_len,
              'loss': loss, 'layers': layers}
    print(format_table(layers))
    print(format_loss(dataset, args.split, loss) + f' | {n_segments} segments of {args.batch_size}x{tgt_len}')

    json_path, png_path = output_path(args, 'json'), output_path(args, 'png')
    try:
        write_json(report, json_path)
        write_heatmap(layers, png_path, f'Expert routing of {os.path.basename(os.path.dirname(os.path.abspath(path)))} '
                      f'on {dataset} {args.split} ({layers[0]["tokens"]} tokens)')
    except files.WriteError as e:
        print(f'moe_report.py: error: {e}', file=sys.stderr)
        return 2
    print(f'Wrote {json_path} and {png_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
