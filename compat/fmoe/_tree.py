"""Nested inputs (a tensor, or lists, tuples and dicts of them), as FastMoE's layer accepts (dm-tree there)."""


def tree_map(fn, tree):
    if isinstance(tree, dict):
        return type(tree)((key, tree_map(fn, value)) for key, value in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, value) for value in tree)
    return fn(tree)


def tree_leaves(tree):
    leaves = []
    tree_map(leaves.append, tree)
    return leaves
