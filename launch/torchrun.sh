#!/usr/bin/env bash
# `darkmatter pretrain` on one or many nodes under torchrun: run the same command on every node.
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0.cluster:29400 RDZV_ID=mlm-42 \
#     launch/torchrun.sh configs/quickstart_mlm.yaml train.steps=10000
#
# Every argument goes to `darkmatter pretrain` (the config, a.b=c overrides, --resume-from ...).
# Variables (under the Kubeflow training operator, the PET_* variables it sets fill in those
# left unset):
#   NNODES          nodes, or MIN:MAX for an elastic range (required; PET_NNODES)
#   NPROC_PER_NODE  ranks per node, usually the GPUs per node (required; PET_NPROC_PER_NODE)
#   RDZV_ENDPOINT   host:port of the rendezvous, reachable from every node; with c10d the node
#                   whose address it names hosts the store (required; PET_RDZV_ENDPOINT)
#   RDZV_ID         the job's id: the same on every node, new for every job
#                   (default: darkmatter; PET_RDZV_ID)
#   RDZV_BACKEND    c10d (default; PET_RDZV_BACKEND) or static (then NODE_RANK is required)
#   NODE_RANK       this node's rank, 0..NNODES-1 (static only: c10d assigns node ranks)
#   LOCAL_ADDR      this node's address as the other nodes reach it, when the hostname does not
#                   resolve to it (torchrun's --local-addr; the ranks get it as MASTER_ADDR)
#   RDZV_CONF       torchrun's --rdzv-conf, e.g. is_host=1,join_timeout=600 (is_host: this node
#                   hosts the c10d store, when torchrun cannot tell from RDZV_ENDPOINT's name)
#   MONITOR_INTERVAL  seconds between torchrun's checks of its ranks (default: torchrun's)
#   MAX_RESTARTS    restarts of the whole group after a rank fails (default 0; PET_MAX_RESTARTS)
#   GRACE_S         the config's faults.grace_s (default 120, the config's default): after a
#                   preemption signal torchrun gives the ranks GRACE_S + 10 s to checkpoint
#   SIGNALS         the config's faults.signals (default SIGTERM,SIGUSR1)
#   PYTHON          the interpreter darkmatter is installed in (default: python3)
#   LAUNCH_DRY_RUN  1: print the torchrun command (shell-quoted) and exit
#
# SIGTERM or SIGUSR1 sent to this script is passed to torchrun, which passes it to every rank:
# the ranks checkpoint at the next step boundary and the script exits 143 (what schedulers
# expect of a job that stopped on request; under SLURM with faults.requeue, rank 0 requeues).
set -euo pipefail

die() {
  echo "launch/torchrun.sh: error: $*" >&2
  exit 2
}

NNODES=${NNODES:-${PET_NNODES:-}}
NPROC_PER_NODE=${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-}}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-${PET_RDZV_ENDPOINT:-}}
RDZV_ID=${RDZV_ID:-${PET_RDZV_ID:-darkmatter}}
RDZV_BACKEND=${RDZV_BACKEND:-${PET_RDZV_BACKEND:-c10d}}
MAX_RESTARTS=${MAX_RESTARTS:-${PET_MAX_RESTARTS:-0}}
NODE_RANK=${NODE_RANK:-}
GRACE_S=${GRACE_S:-120}
SIGNALS=${SIGNALS:-SIGTERM,SIGUSR1}
PYTHON=${PYTHON:-python3}

[[ -n "$NNODES" ]] || die "set NNODES (number of nodes, or MIN:MAX)"
[[ -n "$NPROC_PER_NODE" ]] || die "set NPROC_PER_NODE (ranks per node)"
[[ -n "$RDZV_ENDPOINT" ]] || die "set RDZV_ENDPOINT (host:port of the rendezvous)"
[[ "$RDZV_ENDPOINT" =~ ^.+:[0-9]+$ ]] || die "RDZV_ENDPOINT: expected host:port, got '$RDZV_ENDPOINT'"
[[ "$NNODES" =~ ^[0-9]+(:[0-9]+)?$ ]] || die "NNODES: expected N or MIN:MAX, got '$NNODES'"
[[ "$NPROC_PER_NODE" =~ ^[0-9]+$ ]] || die "NPROC_PER_NODE: expected a number, got '$NPROC_PER_NODE'"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS: expected a number, got '$MAX_RESTARTS'"
[[ "$GRACE_S" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "GRACE_S: expected seconds, got '$GRACE_S'"
[[ $# -ge 1 ]] || die "usage: launch/torchrun.sh CONFIG [a.b=c ...] (see the top of this script)"

cmd=("$PYTHON" -m torch.distributed.run
  --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE"
  --rdzv-backend="$RDZV_BACKEND" --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID"
  --max-restarts="$MAX_RESTARTS"
  --signals-to-handle="SIGINT,$SIGNALS"
  --shutdown-timeout="$((${GRACE_S%.*} + 10))")
[[ -z "${LOCAL_ADDR:-}" ]] || cmd+=(--local-addr="$LOCAL_ADDR")
[[ -z "${RDZV_CONF:-}" ]] || cmd+=(--rdzv-conf="$RDZV_CONF")
[[ -z "${MONITOR_INTERVAL:-}" ]] || cmd+=(--monitor-interval="$MONITOR_INTERVAL")
if [[ "$RDZV_BACKEND" == static ]]; then
  [[ -n "$NODE_RANK" ]] || die "set NODE_RANK (this node's rank) for the static rendezvous"
  cmd+=(--node-rank="$NODE_RANK")
fi
cmd+=(-m darkmatter.cli pretrain "$@")

# Each round (a restart) gets a fresh store: with the agent's store shared across rounds, a
# restarted gloo group can pick up its dead predecessor's keys and hang.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

if [[ "${LAUNCH_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

# torchrun runs as a child rather than exec'd so that a preemption ends in 143, whatever
# torchrun's own exit status after it stopped its ranks. Job control on (set -m): a background
# command of a script would otherwise start with SIGINT ignored, and so would every rank.
stopped=""
set -m
"${cmd[@]}" &
child=$!
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
  [[ "$1" == INT ]] || stopped=$1
  kill -s "$1" "$child" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT
rc=0
while :; do
  wait "$child" && rc=0 || rc=$?
  kill -0 "$child" 2>/dev/null || break # a trap interrupted `wait`: torchrun is still running
done
if [[ -n "$stopped" ]]; then
  echo "launch/torchrun.sh: stopped by SIG$stopped (torchrun exited $rc): exit 143" >&2
  exit 143
fi
exit "$rc"
