"""The corpus a saved model was trained on, for the scripts that load one (eval.py, generate.py, moe_report.py,
convert_checkpoint.py): the checkpoint names it, the user may point elsewhere, and its vocabulary must be the
model's."""
from data_utils import get_lm_corpus
from utils.checkpoint import check_vocab
from utils.errors import DataError
from utils.vocabulary import silent


def open_corpus(saved, path, n_token, data=None, dataset=None, log=silent):
    """(corpus, dataset, data) of a saved model (checkpoint dict `saved`, read from `path`): data/dataset when
    given, else the run's own. DataError when it is unknown or its vocabulary is not the model's n_token symbols;
    CheckpointError when it has as many symbols but other ones. log: get_lm_corpus's."""
    train_args = saved.get('args') or {}
    dataset = dataset or train_args.get('dataset')
    data = data or train_args.get('data')
    if not dataset or not data:
        raise DataError('{} does not say which corpus the model was trained on: pass --data DIR and '
                        '--dataset NAME'.format(path))
    corpus = get_lm_corpus(data, dataset, saved.get('vocab'), log=log)  # an imported model's own vocabulary
    if len(corpus.vocab) != n_token:
        known = train_args.get('dataset') and train_args.get('data')  # a converted model may not say
        raise DataError('{} at {} has {} tokens but the model in {} has {}: pass the --data/--dataset it was '
                        'trained on{}'.format(dataset, data, len(corpus.vocab), path, n_token,
                                              ' ({} at {})'.format(train_args['dataset'], train_args['data'])
                                              if known else ''))
    check_vocab(saved, corpus.vocab.idx2sym, path, '{} at {}'.format(dataset, data))  # the same ids, not only as many
    return corpus, dataset, data
