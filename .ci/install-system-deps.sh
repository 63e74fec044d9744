#!/usr/bin/env bash
# Debian packages the test suite uses: a real Prometheus (and promtool) for the deployment
# tests, Chromium and its WebDriver (chromium-driver: /usr/bin/chromedriver) for the web page
# tests, which skip without either and fail without either under CI=true. Idempotent: returns
# at once when every package is already installed. Works as root (CI) or through sudo.
set -euo pipefail

packages=(prometheus chromium chromium-driver)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "system deps present: ${packages[*]}"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "install-system-deps: need root or sudo to install: ${missing[*]}" >&2
    exit 1
fi

echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

# A package can install without its binary (Ubuntu's chromium packages are snap stubs); say so
# here rather than as skipped or failed page tests later.
for binary in chromium chromedriver; do
    if ! command -v "$binary" >/dev/null 2>&1; then
        echo "install-system-deps: $binary is not on PATH after installing ${missing[*]}" >&2
        exit 1
    fi
done
