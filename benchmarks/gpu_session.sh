#!/usr/bin/env bash
# The GPU measurements and checks heft still owes (docs/performance.md), prepared to run on a lent
# GPU machine that has torch but no megatron-core or mosaicml-streaming and no network.
#
#   bash benchmarks/gpu_session.sh fetch          # here, with PyPI: the missing wheels into .whl/
#   bash benchmarks/gpu_session.sh bench [OUT]    # on the GPU: tokens/s and MFU (benchmarks/run_all.py
#                                                 # --only gpu --only step), about 5 minutes
#   bash benchmarks/gpu_session.sh tests [OUT]    # on the GPU: tests/test_gpu.py, about 5 minutes
#
# Each GPU command installs the wheels and heft into /tmp first (nothing persists on such a
# machine) and writes its logs and JSON under OUT (default: $OUT, else gpu-out/).
set -euo pipefail
cd "$(dirname "$0")/.."

# Imported by heft's training path and missing from the GPU image (streaming's compression
# codecs import at module level; catalogue is megatron-core's). The versions heft's own venv runs,
# except zstd: 1.5.7.2 has no cp312 manylinux wheel, and 1.5.6.2 and 1.5.7.3 are yanked.
WHEELS=(megatron-core==0.16.1 mosaicml-streaming==0.13.0 brotli==1.2.1 python-snappy==0.7.3
        cramjam==2.14.0 zstd==1.5.6.1 catalogue==2.0.10)
PYTHON_VERSION=${PYTHON_VERSION:-3.12}   # the GPU image's Python

install_on_gpu() {
  python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
    || { echo "gpu_session: $1 needs a CUDA GPU and its python3 with torch; run it on the GPU machine" >&2; exit 2; }
  ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_session: no .whl/; run 'bash $0 fetch' where PyPI is reachable and carry .whl" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  # heft itself, as pyproject.toml maps it (launcher/ -> heft.launcher, ...), without a build;
  # its other dependencies are in the image.
  mkdir -p /tmp/heft-site/heft
  for room in launcher model reweighting data slurm; do ln -sfn "$PWD/$room" "/tmp/heft-site/heft/$room"; done
  export PYTHONPATH=/tmp/heft-site:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
  python3 -c "import torch, megatron.core, streaming, heft.launcher.train.loop; print('torch', torch.__version__, torch.cuda.get_device_name())"
}

case "${1:-}" in
  fetch)
    rm -f .whl/*.whl  # two versions of one package would stop the install there
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d .whl "${WHEELS[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
    [ "$(ls .whl/*.whl 2>/dev/null | wc -l)" -eq "${#WHEELS[@]}" ] || { echo "gpu_session: fetch failed" >&2; exit 1; }
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    ls .whl
    ;;
  bench|tests)
    out=${2:-${OUT:-gpu-out}}
    install_on_gpu "$1"
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out/machine.csv" || true
    if [ "$1" = bench ]; then
      python3 benchmarks/run_all.py --only gpu --only step --json "$out/gpu_rows.json" 2>&1 | tee "$out/bench.log"
    else
      # pytest-timeout is in the image: a hung case cannot eat the rest of the lease.
      python3 -m pytest tests/test_gpu.py -q -rA -s -p no:cacheprovider --timeout 240 2>&1 | tee "$out/test_gpu.log"
    fi
    ;;
  *)
    sed -n '2,/^set /p' "$0" | grep '^#'  # the header above
    exit 2
    ;;
esac
