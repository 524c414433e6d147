#!/usr/bin/env bash
# One-shot set-up for a fresh machine: a virtualenv in .venv with torch pinned through a constraints file,
# this package (newbie_core + the `newbie` command) installed editable with its `torch` and `test` extras.
# If a ComfyUI source tree is found ($COMFYUI_DIR, or the ComfyUI tree this pack sits in; see
# scripts/find_comfyui.py), its requirements are installed into the same venv so the node and integration tests
# can run it. If a second, newer ComfyUI tree is found too ($COMFYUI_DIR_2, ~/ComfyUI-0.4.0, /work/ComfyUI-0.4.0),
# a second venv .venv-comfyui-<its version> gets the same packages + that tree's requirements: the tests re-run
# their ComfyUI part there (tests/hosts.py).
#
# Environment: PYTHON (default python3), TORCH_VERSION (default 2.13.0), VENV (default .venv), COMFYUI_DIR,
# COMFYUI_DIR_2 (empty: no second host).
# Re-running is cheap: pip finds everything already installed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VENV=${VENV:-$root/.venv}
start=$SECONDS
say() { echo "[setup +$((SECONDS - start))s] $*"; }

# make_venv VENV [COMFYUI_TREE]: torch pinned, this package + extras, and the tree's requirements when given.
make_venv() {
  local venv=$1 comfy=${2:-} py sp
  [[ -x $venv/bin/python ]] || { say "creating $venv"; "$PYTHON" -m venv "$venv"; }
  py=$venv/bin/python
  # torchvision/torchaudio pins matter only for ComfyUI; they keep pip from pulling a newer (CUDA) torch.
  cat >"$venv/constraints.txt" <<CONS
torch==$TORCH_VERSION
torchvision==0.28.0
torchaudio==2.11.0
CONS
  export PIP_CONSTRAINT=$venv/constraints.txt PIP_DISABLE_PIP_VERSION_CHECK=1
  pipi() { "$py" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
  say "$venv: torch==$TORCH_VERSION (constraints: $venv/constraints.txt)"
  pipi "torch==$TORCH_VERSION"
  say "$venv: newbie_core (editable) + torch and test extras"
  pipi -e ".[torch,test]" accelerate
  if [[ -n $comfy ]]; then
    say "$venv: ComfyUI $("$py" scripts/find_comfyui.py --version-of "$comfy" 2>/dev/null || true)tree at $comfy: its requirements"
    pipi -r "$comfy/requirements.txt" requests
    sp=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if "$py" -c 'import torch,sys; sys.exit(0 if torch.version.cuda is None else 1)'; then
      cp "$root/tools/torchvision_cpu_shim.py" "$sp/torchvision_cpu_shim.py"
      echo "import torchvision_cpu_shim" >"$sp/torchvision_cpu_shim.pth"
      if ! "$py" -c 'import torchaudio' >/dev/null 2>&1; then rm -f "$sp"/torchaudio/lib/*.so; fi
    fi
  fi
  say "$venv done: $("$py" -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)')"
}

comfy=$("$PYTHON" "$root/scripts/find_comfyui.py" || true)
[[ -n $comfy ]] || say "no ComfyUI tree found (set COMFYUI_DIR): node and integration tests will skip"
make_venv "$VENV" "$comfy"

# Triton, for its CPU interpreter only (tests/core/test_fp8_gate.py runs the GPU kernels' logic on the CPU), kept
# aside in .triton-interp rather than in the venv. Best effort: without it (no network or disk) those tests skip.
if [[ ! -d $root/.triton-interp/triton ]]; then
  tmp=$(mktemp -d "$root/.triton-interp.XXXXXX")
  if "$VENV/bin/python" -m pip install -q --no-deps --target "$tmp" triton==3.9.0 2>/dev/null; then
    rm -rf "$root/.triton-interp" && mv "$tmp" "$root/.triton-interp" && say "Triton 3.9.0 (interpreter tests) in .triton-interp"
  else
    rm -rf "$tmp"; say "Triton not installed: the Triton-interpreter tests will skip"
  fi
fi

comfy2=$("$PYTHON" "$root/scripts/find_comfyui.py" --second || true)
if [[ -n $comfy2 ]]; then
  make_venv "$root/$("$PYTHON" "$root/scripts/find_comfyui.py" --venv)" "$comfy2"
fi
