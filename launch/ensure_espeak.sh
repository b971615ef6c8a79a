#!/usr/bin/env bash
# Ensure espeak-ng (Debian's package) is here: the wav2vec2 quickstart speaks its spoken-digits
# corpus with it, offline (darkmatter/quickstart/speech.py).
#
# Idempotent and quiet: a fast no-op when the binary is there. It never fails the build: where
# it cannot install (not root, no apt-get, no network) it says why and exits 0, and what needs
# the speech data says the same when it runs.
set -uo pipefail

if command -v espeak-ng >/dev/null 2>&1; then
  exit 0
fi
if [[ "$(id -u)" -ne 0 ]]; then
  echo "ensure_espeak: espeak-ng missing and not root: no spoken digits" \
    "(install with: sudo apt-get install -y espeak-ng)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_espeak: espeak-ng missing and no apt-get here: no spoken digits" >&2
  exit 0
fi

echo "ensure_espeak: installing Debian package espeak-ng" >&2
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
# --no-install-recommends: the synthesizer and its voice data, not the sound-server plugins.
if ! { apt-get update -qq >"$log" 2>&1 &&
  apt-get install -y -qq --no-install-recommends espeak-ng >>"$log" 2>&1; }; then
  echo "ensure_espeak: apt-get could not install espeak-ng (no spoken digits):" \
    "$(grep -E '^(E|W):' "$log" | head -1)" >&2
fi
rm -f "$log"
exit 0
