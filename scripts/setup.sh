#!/usr/bin/env bash
# One-shot set-up for a fresh machine: a virtualenv in .venv with torch pinned through a constraints file,
# this package (newbie_core + the `newbie` command) installed editable, and the test extras.
# If a ComfyUI source tree is found ($COMFYUI_DIR, or the ComfyUI tree this pack sits in), its requirements
# are installed into the same venv so the integration tests can start a real server.
#
# Environment: PYTHON (default python3), TORCH_VERSION (default 2.13.0), VENV (default .venv), COMFYUI_DIR.
# Re-running is cheap: pip finds everything already installed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VENV=${VENV:-$root/.venv}
start=$SECONDS
say() { echo "[setup +$((SECONDS - start))s] $*"; }

[[ -x $VENV/bin/python ]] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PY=$VENV/bin/python
# torchvision/torchaudio pins matter only for ComfyUI; they keep pip from pulling a newer (CUDA) torch.
cat >"$VENV/constraints.txt" <<CONS
torch==$TORCH_VERSION
torchvision==0.28.0
torchaudio==2.11.0
CONS
export PIP_CONSTRAINT=$VENV/constraints.txt PIP_DISABLE_PIP_VERSION_CHECK=1
pipi() { "$PY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

say "torch==$TORCH_VERSION (constraints: $VENV/constraints.txt)"
pipi "torch==$TORCH_VERSION"
say "newbie_core (editable) + test extras"
pipi -e ".[test]" accelerate

comfy=$("$PY" "$root/scripts/find_comfyui.py" || true)
if [[ -n $comfy ]]; then
  say "ComfyUI tree at $comfy: installing its requirements"
  pipi -r "$comfy/requirements.txt" requests
  sp=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if ! "$PY" -c 'import torch,sys; sys.exit(0 if torch.version.cuda is None else 1)'; then :; else
    cp "$root/tools/torchvision_cpu_shim.py" "$sp/torchvision_cpu_shim.py"
    echo "import torchvision_cpu_shim" >"$sp/torchvision_cpu_shim.pth"
    if ! "$PY" -c 'import torchaudio' >/dev/null 2>&1; then rm -f "$sp"/torchaudio/lib/*.so; fi
  fi
else
  say "no ComfyUI tree found (set COMFYUI_DIR): integration tests will skip"
fi
say "done: $("$PY" -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)')"
