#!/bin/sh
# Debian's Chromium for the inspector's browser test: Playwright drives this system browser
# (its own browser download is never used). Does nothing when `chromium` is already there.
set -eu
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ]; then as_root=""; else as_root="sudo"; fi
echo "tests/chromium.sh: installing Debian's chromium for the browser test" >&2
$as_root apt-get update -q
$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
