"""Dependencies go one way. The layers, lowest first:

    utils/                                leaf helpers: import nothing of this repository outside utils/
    moe.py, data_utils.py                 the MoE layer and the data
    mem_transformer.py                    the model (imports moe.py)
    run/, compat/                         the run layer (training, evaluation, model files, ...) and FastMoE's API
    scripts, bench/                       thin programs

A file imports only from layers below its own, or from its own package (utils/ from utils/, run/ from run/).
Library code lives in modules, and scripts only call them: no script imports another script, and no module
imports a script. Read from the source with `ast`, so a lazy import inside a function counts too."""
import ast
import subprocess

import pytest

from conftest import ROOT

# Modules that keep a small command-line demo under `if __name__ == '__main__'` but are libraries.
MODULES_WITH_A_DEMO = {'data_utils.py', 'bench/flops.py'}


def python_files(root):
    """Every .py file of the tree, relative to root (git's list where there is one, else a walk)."""
    try:
        listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '*.py'],
                                cwd=root, capture_output=True, text=True, check=True).stdout.split()
        return sorted(p for p in listed if (root / p).is_file())
    except (OSError, subprocess.CalledProcessError):
        return sorted(str(p.relative_to(root)) for p in root.rglob('*.py'))


def parsed(root):
    return {p: ast.parse((root / p).read_text(encoding='utf-8'), p) for p in python_files(root)}


def is_test_module(path):
    return path.startswith('tests/') and path.rsplit('/', 1)[-1].startswith('test_')


def is_script(path, tree):
    """A file run as a program: it has a `__main__` block and is neither a test module nor a library demo."""
    if path in MODULES_WITH_A_DEMO or is_test_module(path):
        return False
    return any(isinstance(node, ast.If) and "'__main__'" in ast.unparse(node.test) for node in tree.body)


def imported_files(path, tree, files):
    """The tree's files that `path` imports: names resolve next to the importing file first (a script's own
    directory is on sys.path, as bench/'s scripts use it), then at the repository root."""
    folder = path.rsplit('/', 1)[0] + '/' if '/' in path else ''
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f'{node.module}.{alias.name}' for alias in node.names)   # from package import module
    found = set()
    for name in names:
        relative = name.replace('.', '/')
        for candidate in (folder + relative + '.py', relative + '.py', relative + '/__init__.py'):
            if candidate in files:
                found.add(candidate)
                break
    return found - {path}


def layering_violations(root):
    """'importer -> script' for every import of a script by a file that is not a test module."""
    trees = parsed(root)
    scripts = {p for p, tree in trees.items() if is_script(p, tree)}
    return sorted(f'{p} -> {imported}' for p, tree in trees.items()
                  if not is_test_module(p)
                  for imported in imported_files(p, tree, set(trees)) if imported in scripts)


# Each library file's layer; a top-level library module must be listed here to be placed.
TOP_LEVEL_LAYERS = {'moe.py': 1, 'data_utils.py': 1, 'mem_transformer.py': 2}
SCRIPT_LAYER = 4


def layer_of(path, tree):
    """(layer, package) of a file; files of one package may import each other. None for tests."""
    if path.startswith('tests/'):
        return None
    folder = path.split('/', 1)[0] if '/' in path else None
    if is_script(path, tree):
        return SCRIPT_LAYER, folder
    if folder == 'utils':
        return 0, 'utils'
    if folder in ('run', 'compat'):
        return 3, folder
    if folder == 'bench':
        return SCRIPT_LAYER, 'bench'
    return TOP_LEVEL_LAYERS.get(path, -1), None   # -1: an unplaced module, reported by upward_imports


def upward_imports(root):
    """'importer -> imported' for every import of a file that is not in a layer below the importer's (nor in its
    package), and 'unplaced: path' for a top-level library module TOP_LEVEL_LAYERS does not place."""
    trees = parsed(root)
    layers = {p: layer_of(p, tree) for p, tree in trees.items()}
    found = sorted(f'unplaced: {p}' for p, layer in layers.items() if layer is not None and layer[0] < 0)
    for p, tree in trees.items():
        if layers[p] is None:
            continue
        (level, package) = layers[p]
        for imported in imported_files(p, tree, set(trees)):
            other = layers[imported]
            if other is None or (package is not None and other[1] == package):
                continue
            if not other[0] < level:
                found.append(f'{p} -> {imported}')
    return sorted(found)


def test_every_import_goes_down_the_layers():
    assert upward_imports(ROOT) == []


def test_the_layers_are_found():
    """The check places the files the rule is about where the module docstring says."""
    trees = parsed(ROOT)
    layers = {p: layer_of(p, tree)[0] for p, tree in trees.items() if not p.startswith('tests/')}
    assert {layers[p] for p in ('utils/files.py', 'utils/checkpoint.py', 'utils/vocabulary.py')} == {0}
    assert layers['moe.py'] < layers['mem_transformer.py'] < layers['run/training.py'] < layers['train.py']
    assert layers['data_utils.py'] < layers['run/training.py']
    assert layers['compat/fmoe/__init__.py'] == layers['run/training.py']


UPWARD_IMPORTS = {
    'utils/helper.py': 'import data_utils\n',                            # a leaf importing the data
    'utils/other.py': 'def f():\n    from run import training\n',        # a lazy import of the run layer
    'moe.py': 'import mem_transformer\n',                                # the MoE layer importing the model
    'data_utils.py': 'from moe import x\n',                              # the data importing the model side
    'mem_transformer.py': 'from run.training import x\n',                # the model importing the run layer
    'run/training.py': 'import train\n',                                 # the run layer importing a script
    'compat/fmoe/layers.py': 'from run import training\n',               # compat beside run, not above it
    'extra.py': '',                                                      # a top-level module no layer places
}


@pytest.mark.parametrize('path', UPWARD_IMPORTS)
def test_an_upward_import_is_caught(tmp_path, path):
    files = {'train.py': "import mem_transformer\nif __name__ == '__main__':\n    main()\n",
             'utils/__init__.py': '', 'utils/helper.py': 'from utils import other\n', 'utils/other.py': '',
             'moe.py': 'from utils import helper\n', 'data_utils.py': 'import utils.other\n',
             'mem_transformer.py': 'import moe\n', 'run/__init__.py': '', 'run/training.py': 'import data_utils\n',
             'run/evaluation.py': 'from run import training\n', 'compat/fmoe/layers.py': 'import moe\n',
             'tests/test_x.py': 'import train\n'}
    files[path] = UPWARD_IMPORTS[path] + files.get(path, '')
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    offenders = {line.split(' -> ')[0].replace('unplaced: ', '') for line in upward_imports(tmp_path)}
    assert offenders == {path}


def test_no_script_or_module_imports_a_script():
    assert layering_violations(ROOT) == []


def test_the_scripts_are_found():
    """The check sees the scripts the rule is about, and takes the libraries for libraries."""
    trees = parsed(ROOT)
    scripts = {p for p, tree in trees.items() if is_script(p, tree)}
    assert {'train.py', 'eval.py', 'study.py', 'plot.py', 'bench/run_all.py', 'bench/bench_train.py'} <= scripts
    assert not scripts & {'mem_transformer.py', 'data_utils.py', 'run/training.py', 'bench/timing.py',
                          'bench/flops.py', 'tests/test_train.py'}


BAD_IMPORTS = {
    'utils/helper.py': 'def f():\n    import train\n',                     # a lazy import in a library module
    'plot.py': 'from study import x\n',                                    # a script importing a script
    'bench/bench_a.py': 'import bench_b\n',                                # a bench script importing another
    'bench/shared.py': 'from train import build_parser\n',                 # a bench module importing a script
}


@pytest.mark.parametrize('path', BAD_IMPORTS)
def test_a_bad_import_is_caught(tmp_path, path):
    main = "if __name__ == '__main__':\n    main()\n"
    files = {'train.py': main, 'study.py': main, 'plot.py': main, 'utils/__init__.py': '', 'utils/helper.py': '',
             'bench/bench_a.py': main, 'bench/bench_b.py': main, 'bench/shared.py': 'import timing\n',
             'bench/timing.py': '', 'tests/test_x.py': 'import train\nimport study\n'}   # tests may import scripts
    files[path] = BAD_IMPORTS[path] + files[path]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert len(layering_violations(tmp_path)) == 1


def imports_of_test_modules(root=ROOT):
    """Test modules share what they share through tests/conftest.py, never by importing each other."""
    trees = parsed(root)
    return sorted(f'{p} -> {imported}' for p, tree in trees.items()
                  for imported in imported_files(p, tree, set(trees)) if is_test_module(imported))


def test_no_file_imports_a_test_module():
    assert imports_of_test_modules() == []


def test_an_import_of_a_test_module_is_caught(tmp_path):
    (tmp_path / 'tests').mkdir()
    (tmp_path / 'tests' / 'test_a.py').write_text('def helper():\n    pass\n')
    (tmp_path / 'tests' / 'kill_storm.py').write_text('from tests.test_a import helper\n')
    (tmp_path / 'tests' / 'test_b.py').write_text('from test_a import helper\n')
    assert imports_of_test_modules(tmp_path) == [
        'tests/kill_storm.py -> tests/test_a.py', 'tests/test_b.py -> tests/test_a.py']
