"""Library code lives in modules, and scripts only call them: no script imports another script, and no module
(utils/, the model, the data, bench/'s shared modules) imports a script. Read from the source with `ast`, so a
lazy import inside a function counts too."""
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


def test_no_script_or_module_imports_a_script():
    assert layering_violations(ROOT) == []


def test_the_scripts_are_found():
    """The check sees the scripts the rule is about, and takes the libraries for libraries."""
    trees = parsed(ROOT)
    scripts = {p for p, tree in trees.items() if is_script(p, tree)}
    assert {'train.py', 'eval.py', 'study.py', 'plot.py', 'bench/run_all.py', 'bench/bench_train.py'} <= scripts
    assert not scripts & {'mem_transformer.py', 'data_utils.py', 'utils/training.py', 'bench/timing.py',
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
