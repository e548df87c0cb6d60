# Sourced by demo.sh and test.sh, the README's Quick start. `use_python REQUIREMENT_FILE...` sets PY to a Python
# that has what those files list, installing only what is missing:
#   - the Python is $PYTHON if set, else the activated virtual or conda environment's, else python3;
#   - one that already has everything is used as it is: a `==` pin must match, except beside a `>=` bound (torch's
#     line): then the pin is what a fresh install gets and any version from the bound on is kept;
#   - one that is externally managed (PEP 668: Debian's and Ubuntu's system Python) is never installed into:
#     the packages go into a virtual environment .venv in this repository, made once and reused.

PY_ENV_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Prints `managed` if pip must not install into this Python (PEP 668 marker outside a virtual environment),
# `no-pip` if it has no pip, else `ok`; then the requirement lines of the given files that it lacks.
_PY_ENV_PROBE='
import importlib.util, os, re, sys, sysconfig
from importlib import metadata

def release(version):  # 2.13.0+cpu -> (2, 13)
    parts = [int(part) for part in re.match(r"\d+(\.\d+)*", version).group().split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)

in_venv = sys.prefix != sys.base_prefix
if not in_venv and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")):
    print("managed")
else:
    print("ok" if importlib.util.find_spec("pip") else "no-pip")
for path in sys.argv[1:]:
    for line in open(path):
        requirement = line.split("#")[0].split(";")[0].strip()
        if not requirement:
            continue
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*(.*)", requirement).groups()
        try:
            have = release(metadata.version(name))
        except metadata.PackageNotFoundError:
            print(requirement)
            continue
        bounds = re.findall(r">=\s*([0-9][0-9.]*)", spec)
        pins = [] if bounds else re.findall(r"==\s*([0-9][0-9.]*)", spec)
        if any(have < release(bound) for bound in bounds) or any(have != release(pin) for pin in pins):
            print(requirement)
'

# _py_env_probe PYTHON FILE...: runs the probe; fails (status 1) if PYTHON does not run it: a command that exits 0
# without printing the probe's first line (true, echo) is no Python.
_py_env_probe() {
    local out
    out=$("$1" -c "$_PY_ENV_PROBE" "${@:2}") && [[ $(head -n 1 <<<"$out") =~ ^(ok|managed|no-pip)$ ]] || return 1
    printf '%s\n' "$out"
}

use_python() {
    local files=() file probe state missing
    for file in "$@"; do files+=("$PY_ENV_ROOT/$file"); done
    if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
    elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then PY=$VIRTUAL_ENV/bin/python
    elif [[ -n ${CONDA_PREFIX:-} && -x $CONDA_PREFIX/bin/python ]]; then PY=$CONDA_PREFIX/bin/python
    else PY=python3
    fi
    if ! command -v "$PY" >/dev/null; then
        echo "error: no $PY on PATH: install Python 3 (Debian/Ubuntu: apt-get install python3-venv) or set PYTHON" >&2
        exit 1
    fi
    probe=$(_py_env_probe "$PY" "${files[@]}") || { echo "error: $PY does not run as a Python 3: set PYTHON to one" >&2; exit 1; }
    state=$(head -n 1 <<<"$probe")
    missing=$(tail -n +2 <<<"$probe")
    [[ -z $missing ]] && return 0
    if [[ $state == managed ]]; then
        _use_repo_venv
        probe=$(_py_env_probe "$PY" "${files[@]}") || { echo "error: $PY does not run: remove $PY_ENV_ROOT/.venv and run again" >&2; exit 1; }
        state=$(head -n 1 <<<"$probe")
        missing=$(tail -n +2 <<<"$probe")
        [[ -z $missing ]] && return 0
    fi
    if [[ $state == no-pip ]]; then
        echo "error: $PY has no pip to install ${missing//$'\n'/ }: install them, or set PYTHON to another Python" >&2
        exit 1
    fi
    echo "== Installing into $PY: ${missing//$'\n'/ }"
    local requirements=()
    mapfile -t requirements <<<"$missing"
    "$PY" -m pip install -q "${requirements[@]}"
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
