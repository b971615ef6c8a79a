#!/usr/bin/env bash
# Ensure the quickstart's real text is present, all of it Debian packages:
#   fortunes, fortunes-min  the fortune-cookie files, one category per file (pretraining text,
#                           and the second text task's labels)
#   dict-gcide              Webster's 1913 dictionary, within GCIDE (pretraining text)
#   python3-doc             Python's documentation, its reStructuredText sources (pretraining text)
#   wordnet-base            WordNet's noun definitions by supersense (the text task from another
#                           source than the pretraining text)
set -euo pipefail

PACKAGES=(fortunes fortunes-min dict-gcide python3-doc wordnet-base)
present() {
  [[ -f /usr/share/games/fortunes/computers && -f /usr/share/games/fortunes/fortunes \
     && -f /usr/share/dictd/gcide.dict.dz && -f /usr/share/wordnet/data.noun ]] \
    && compgen -G "/usr/share/doc/python3*/html/_sources/tutorial/index.rst.txt" > /dev/null
}

if present; then
  exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
  echo "ensure_corpora: installing Debian packages ${PACKAGES[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${PACKAGES[@]}"
  present
  exit 0
fi

echo "ensure_corpora: the quickstart's text corpora are missing; install them with:" >&2
echo "  sudo apt-get install -y ${PACKAGES[*]}" >&2
exit 1
