#!/usr/bin/env bash
# Installs what the tests need (CPU torch pinned first: an unpinned torch pulls CUDA) and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q "transformers==5.23.0" -e ".[test]"
python -m pytest -q "$@"
