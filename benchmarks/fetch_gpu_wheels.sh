#!/usr/bin/env bash
# Download the small wheels the GPU machine's image lacks (it has no network) into the
# git-ignored folder .whl/ at the repository root, for
#     python3 benchmarks/gpu_check.py --wheels .whl      (device tool: carry [".whl"])
#
# The image has torch, torchvision, timm, huggingface_hub, safetensors, regex and tqdm
# (open_clip's other needs) but not open_clip itself nor ftfy (whose one need is wcwidth).
# DALI's wheel (~500 MB) does not fit the 64 MiB transfer limit: gpu_check reports DALI
# as "not installed" and measures the torch/PIL loader instead.
#
# Usage: bash benchmarks/fetch_gpu_wheels.sh [PYTHON]   (PYTHON: one with pip; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
DEST=.whl
# pinned: one version of each (two versions of a package stop the whole install there)
WHEELS=(open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$DEST" "${WHEELS[@]}"
echo "wheels in $DEST:"
for w in "$DEST"/*.whl; do
    # the needs each wheel declares (extras excluded), to check against the image's packages
    needs=$(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
        | sed 's/Requires-Dist: //' | tr '\n' ';' || true)
    printf '  %-45s %6s KiB  needs: %s\n' "$(basename "$w")" "$(( $(stat -c %s "$w") / 1024 ))" "$needs"
done
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total $(( total / 1024 )) KiB (the device transfer limit is 64 MiB with the working tree)"
if [ "$total" -gt $(( 16 * 1024 * 1024 )) ]; then
    echo "fetch_gpu_wheels: error: wheels total more than 16 MiB; remove extra versions from $DEST" >&2
    exit 1
fi
