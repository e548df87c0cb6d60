"""Reading checkpoints written by earlier versions of this code in today's terms."""


def data_state(state):
    """The training iterator's state in a checkpoint. Checkpoints written before the iterators owned their
    position and RNG hold `position` (a row, or the shuffled iterator's dict) and numpy's global RNG, which
    drew the varlen lengths and shuffles: the same state in the iterator's terms."""
    if 'data' in state:
        return state['data']
    numpy = state['rng']['numpy']
    rng = [numpy['kind'], numpy['keys'].tolist(), numpy['pos'], numpy['has_gauss'], numpy['cached_gaussian']]
    position = state['position']
    if isinstance(position, dict):  # a shuffled corpus
        return dict(position, rng=rng)
    return {'position': position or 0, 'rng': rng}
