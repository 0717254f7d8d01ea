# Sourced by the benchmarks/device_*.sh scripts (from the repository root) on a GPU machine
# without network: the project's sources on PYTHONPATH, and the wheels carried in .whl/ (if
# any; bash ../shared/device/wheels.sh fills it) installed to /tmp/site.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
fi
