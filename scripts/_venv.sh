# Sourced by the scripts here: creates (once) and activates the virtual environment at $MINILLM_VENV
# (default .venv) with the CPU build of torch. torch goes in first and pinned: an unpinned torch, or
# one pulled in as a dependency, resolves to a multi-GB CUDA build. MINILLM_TORCH overrides the pin.
VENV="${MINILLM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "${MINILLM_TORCH:-torch==2.13.0}"
export OMP_WAIT_POLICY=PASSIVE
