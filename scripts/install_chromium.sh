#!/usr/bin/env bash
# Install the distribution's Chromium for the browser tests (tests/integration/browser), when that is possible:
# already on PATH (chromium / chromium-browser) or $NEWBIE_CHROMIUM set → nothing to do; else root with apt-get →
# `apt-get install -y chromium` (Debian's package; ~20 s, ~350 MB). Playwright's own browser download is not used.
# Exit status 0 when a Chromium is available afterwards, 1 otherwise (callers decide whether that matters).
set -uo pipefail
say() { echo "[chromium] $*"; }

for name in chromium chromium-browser; do
  if command -v "$name" >/dev/null 2>&1; then say "found $(command -v "$name")"; exit 0; fi
done
if [[ -n ${NEWBIE_CHROMIUM:-} && -x ${NEWBIE_CHROMIUM} ]]; then say "using NEWBIE_CHROMIUM=$NEWBIE_CHROMIUM"; exit 0; fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  say "not installed (needs root and apt-get; or: sudo apt-get install -y chromium)"
  exit 1
fi
start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if apt-get install -y -q chromium >"$log" 2>&1 \
   || { apt-get update -q >>"$log" 2>&1 && apt-get install -y -q chromium >>"$log" 2>&1; }; then
  say "installed $(chromium --version 2>/dev/null) in $((SECONDS - start)) s"
  rm -f "$log"
  exit 0
fi
say "apt-get install chromium failed; last lines:"
tail -5 "$log" >&2
rm -f "$log"
exit 1
