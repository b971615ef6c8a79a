#!/usr/bin/env bash
# Ensure a single-host SLURM can run on this machine for tests/test_slurm.py: Debian's
# slurm-wlm (slurmctld, slurmd, sbatch, scontrol, ...) and munge (its authentication daemon).
#
# Idempotent and quiet: a fast no-op when the binaries are there. It never fails the build:
# where it cannot install (not root, no apt-get, no network) it says why and exits 0, and
# the SLURM test skips with the same reason.
set -uo pipefail

need=(slurmctld slurmd sbatch scontrol sinfo scancel munged)
missing=()
for bin in "${need[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || [[ -x "/usr/sbin/$bin" ]] || missing+=("$bin")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
  echo "ensure_slurm: ${missing[*]} missing and not root: the SLURM test will be skipped" \
    "(install with: sudo apt-get install -y slurm-wlm munge)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_slurm: ${missing[*]} missing and no apt-get here: the SLURM test will be skipped" >&2
  exit 0
fi

echo "ensure_slurm: installing Debian packages slurm-wlm, munge" >&2
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
# --no-install-recommends: the daemons and clients only, not the docs or the graphical sview.
# policy-rc.d 101 keeps the package scripts from starting system services of their own: the
# test starts its own daemons on free ports with a private configuration.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e "$policy" ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
fi
if apt-get update -qq >"$log" 2>&1 &&
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >>"$log" 2>&1; then
  status=0
else
  status=1
fi
[[ $created_policy -eq 1 ]] && rm -f "$policy"
if [[ $status -ne 0 ]]; then
  echo "ensure_slurm: apt-get could not install slurm-wlm, munge (the SLURM test will be" \
    "skipped): $(grep -E '^(E|W):' "$log" | head -1)" >&2
fi
rm -f "$log"
exit 0
