# Source this on the GPU machine (no network there): puts the repo on PYTHONPATH and installs, from the
# carried .whl/ folder, only the test-time packages the machine lacks (pytest, nbformat, nbclient, ipykernel and their needs).
#   . scripts/gpu_env.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ! python3 -c "import pytest, nbformat, nbclient, ipykernel" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    echo "gpu_env: pytest/nbformat missing and no .whl/ carried (see docs/authoring.md)" >&2
  fi
fi
python3 -c "import torch, triton; print('gpu_env:', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'triton', triton.__version__)"
