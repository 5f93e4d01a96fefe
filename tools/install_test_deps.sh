#!/usr/bin/env bash
# System packages the test suite needs beyond PyPI: Debian's Chromium, which the chat page's browser
# test drives with Playwright (Playwright's own browser download is not used). Needs root to install.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "the browser test needs Debian's chromium package: sudo apt-get install chromium" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
echo "installed $(chromium --version)"
