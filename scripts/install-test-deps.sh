#!/usr/bin/env bash
# Install what the test suite needs, and nothing that is already there (safe to rerun):
#   - exiftool (Debian: libimage-exiftool-perl): the tests read the provenance XMP back with it;
#   - chromium: for the tests that render HTML reports;
#   - the package itself, editable, with its test extras and the pinned CPU torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
command -v exiftool >/dev/null 2>&1 || missing+=(libimage-exiftool-perl)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || missing+=(chromium)

if ((${#missing[@]})); then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq "${missing[@]}"
    else
        echo "warning: not installed: ${missing[*]} (needs root and apt-get);" \
            "the tests that need them are skipped." >&2
    fi
fi

"${PYTHON:-python}" -m pip install "torch==2.13.0" -e ".[test]"
