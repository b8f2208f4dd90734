#!/usr/bin/env bash
# Download, on a machine with internet, the Python packages the GPU image lacks, for run.sh to carry.
#
#   bash benchmarks/gpu/fetch_wheels.sh        -> benchmarks/gpu/wheels/ (ignored by git, <= 60 MiB)
#
# The GPU machine has Python 3.12, torch 2.11 (CUDA 13), triton 3.6, transformers and peft, and no
# internet; it lacks bitsandbytes, fourbit's reference peer. bitsandbytes 0.50.2 ships one wheel
# for every Python and CUDA (py3-none-manylinux_2_24_x86_64, ~43 MB, libbitsandbytes_cuda130.so
# inside); pip matches the manylinux number exactly, hence the one --platform. Its requirements
# (torch, numpy, packaging) are all in the image, so --no-deps. run.sh installs the folder with
# --no-index --no-deps --target and puts that folder first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")"
dest=wheels
mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each: two would stop the install
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 -d "$dest" bitsandbytes==0.50.2
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
ls -l "$dest"
if ((total > 60 * 1024 * 1024)); then
  echo "fetch_wheels.sh: $total bytes, over the 60 MiB this folder may take (64 MiB travel with the tree)" >&2
  exit 1
fi
echo "fetch_wheels.sh: $((total / 1024 / 1024)) MiB in benchmarks/gpu/$dest; carry it: run(carry=[\"benchmarks/gpu/wheels\"], ...)"
