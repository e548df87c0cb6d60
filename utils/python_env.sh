# Sourced by demo.sh and test.sh, the README's Quick start. `use_python REQUIREMENT_FILE...` sets PY to a Python
# that has what those files list, installing with pip only when something is missing:
#   - the Python is $PYTHON if set, else the activated virtual or conda environment's, else python3;
#   - one that already satisfies the files is used as it is (an installed torch >= 2.6, a CUDA build too, is kept);
#   - one that is externally managed (PEP 668: Debian's and Ubuntu's system Python) is never installed into:
#     the packages go into a virtual environment .venv in this repository, made once and reused;
#   - where no torch is installed at all, pip gets torch==$TESTED_TORCH, the version the suite is run with.

PY_ENV_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TESTED_TORCH=2.13.0

# Prints `managed` if pip must not install into this Python (PEP 668 marker outside a virtual environment),
# `no-pip` if it has no pip, else `ok`; then the requirement lines of the given files that it does not satisfy
# (not installed, or outside a `>=` or `==` bound; a line with any other operator is left to pip).
_PY_ENV_PROBE='
import importlib.util, os, re, sys, sysconfig
from importlib import metadata

def release(version):  # 2.13.0+cpu -> (2, 13)
    parts = [int(part) for part in re.match(r"\d+(\.\d+)*", version).group().split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)

def satisfied(name, spec):
    try:
        have = release(metadata.version(name))
    except metadata.PackageNotFoundError:
        return False
    clauses = [re.match(r"\s*(==|>=)\s*([0-9][0-9.]*)\s*$", clause) for clause in spec.split(",") if clause.strip()]
    return all(c and (have >= release(c[2]) if c[1] == ">=" else have == release(c[2])) for c in clauses)

if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")):
    print("managed")
else:
    print("ok" if importlib.util.find_spec("pip") else "no-pip")
for path in sys.argv[1:]:
    for line in open(path):
        requirement = line.split("#")[0].split(";")[0].strip()
        if requirement and not satisfied(*re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?(.*)", requirement).groups()):
            print(requirement)
'

# _py_env_check WHAT_TO_DO: sets state and missing (the probe's first line, the rest) for PY and the files; a PY
# that does not print the probe's first line (true, echo) is no Python: an error saying WHAT_TO_DO.
_py_env_check() {
    local probe
    probe=$("$PY" -c "$_PY_ENV_PROBE" "${files[@]}") || true
    state=$(head -n 1 <<<"$probe")
    [[ $state =~ ^(ok|managed|no-pip)$ ]] || { echo "error: $PY does not run as a Python 3: $1" >&2; exit 1; }
    missing=$(tail -n +2 <<<"$probe")
}

use_python() {
    local files=() file state missing pip_args=()
    for file in "$@"; do files+=("$PY_ENV_ROOT/$file"); pip_args+=(-r "$PY_ENV_ROOT/$file"); done
    _pick_python
    if ! command -v "$PY" >/dev/null; then
        echo "error: no $PY on PATH: install Python 3 (Debian/Ubuntu: apt-get install python3-venv) or set PYTHON" >&2
        exit 1
    fi
    _py_env_check "set PYTHON to one"
    if [[ -n $missing && $state == managed ]]; then
        _use_repo_venv
        _py_env_check "remove $PY_ENV_ROOT/.venv and run again"
    fi
    [[ -z $missing ]] && return 0
    if [[ $state == no-pip ]]; then
        echo "error: $PY has no pip to install ${missing//$'\n'/ }: install them, or set PYTHON to another Python" >&2
        exit 1
    fi
    if ! "$PY" -c 'import importlib.metadata as m; m.version("torch")' 2>/dev/null; then
        pip_args=("torch==$TESTED_TORCH" "${pip_args[@]}")
    fi
    echo "== Installing into $PY (it lacks ${missing//$'\n'/ }): pip install ${pip_args[*]}"
    "$PY" -m pip install -q "${pip_args[@]}"
}

# _pick_python: PY is $PYTHON if set, else the activated virtual or conda environment's Python, else python3.
_pick_python() {
    if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
    elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then PY=$VIRTUAL_ENV/bin/python
    elif [[ -n ${CONDA_PREFIX:-} && -x $CONDA_PREFIX/bin/python ]]; then PY=$CONDA_PREFIX/bin/python
    else PY=python3
    fi
}

# installed_python: sets PY to the Python the Quick start installed into, installing nothing (the run scripts):
# as use_python picks it, where python3 gives way to this repository's .venv when the Quick start made one.
# A Python without torch is an error saying how to get one (exit 2).
installed_python() {
    _pick_python
    [[ $PY == python3 && -x $PY_ENV_ROOT/.venv/bin/python ]] && PY=$PY_ENV_ROOT/.venv/bin/python
    local fix="run the Quick start (bash demo.sh) to install what is needed, or activate the environment that has torch, or set PYTHON=/path/to/python"
    if ! command -v "$PY" >/dev/null; then
        echo "error: no $PY on PATH: $fix" >&2
        exit 2
    fi
    if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' >/dev/null 2>&1; then
        echo "error: $PY has no torch: $fix" >&2
        exit 2
    fi
}

# _use_repo_venv: PY (externally managed) becomes .venv's Python; .venv is made from PY if it is not there yet.
_use_repo_venv() {
    local venv=$PY_ENV_ROOT/.venv
    if [[ -x $venv/bin/python ]]; then
        echo "== Using the virtual environment $venv ($PY is externally managed)"
    elif [[ -e $venv ]]; then
        echo "error: $venv is not a virtual environment: remove it and run again" >&2
        exit 1
    else
        echo "== Making a virtual environment in $venv for the packages ($PY is externally managed); later calls reuse it"
        if ! "$PY" -m venv "$venv" >/dev/null 2>&1; then
            rm -rf "$venv"
            echo "error: $PY cannot make a virtual environment: install its venv module (Debian/Ubuntu: apt-get install python3-venv) and run again" >&2
            exit 1
        fi
    fi
    PY=$venv/bin/python
}
