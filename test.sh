#!/usr/bin/env bash
# Runs the test suite (the README's Quick start; .ci/run runs exactly this). It installs what requirements.txt and
# requirements-test.txt list into the Python it uses (utils/python_env.sh says which: an activated environment, or
# python3, or a .venv made here when python3 is the system's own). Arguments go to pytest (bash test.sh -k moe).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source utils/python_env.sh
use_python requirements.txt requirements-test.txt
exec "$PY" -m pytest -q "$@"
