# Sourced by the GPU scripts after they cd to the repo root: the package on PYTHONPATH and, where the GPU
# image lacks them (the entmax package), the wheels carried along in .whl/, installed into /tmp/site.
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if ! "${PYTHON:-python3}" -c "import entmax" 2>/dev/null && ls .whl/*.whl > /dev/null 2>&1; then
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
