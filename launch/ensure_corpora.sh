#!/usr/bin/env bash
# Ensure the quickstart's real labeled text corpus is present: Debian's fortune-cookie files
# (packages fortunes + fortunes-min), one category per file under /usr/share/games/fortunes.
set -euo pipefail

FORTUNES_DIR=/usr/share/games/fortunes
MARKER="$FORTUNES_DIR/computers"  # shipped by `fortunes`; fortunes-min ships `fortunes`

if [[ -f "$MARKER" && -f "$FORTUNES_DIR/fortunes" ]]; then
  exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
  echo "ensure_corpora: installing Debian packages fortunes, fortunes-min" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq fortunes fortunes-min
  exit 0
fi

echo "ensure_corpora: $MARKER is missing; install the corpus with:" >&2
echo "  sudo apt-get install -y fortunes fortunes-min" >&2
exit 1
