#!/usr/bin/env bash
# `darkmatter pretrain` under DeepSpeed's launcher: run it once, on the first host of the
# hostfile; DeepSpeed starts the ranks on every host (over pdsh/ssh, MPI or SLURM).
#
#   HOSTFILE=hostfile MASTER_ADDR=node0.cluster launch/deepspeed.sh \
#     configs/quickstart_mlm.yaml train.steps=10000
#
# The hostfile has one line per host, `HOST slots=N` (N ranks, usually its GPUs). Every argument
# goes to `darkmatter pretrain` (the config, a.b=c overrides, --resume-from ...). Variables:
#   HOSTFILE       the hostfile (required)
#   INCLUDE        only these hosts/slots, e.g. "node0@node1:0,2" (deepspeed --include)
#   EXCLUDE        all but these, same form (--exclude; not together with INCLUDE)
#   LAUNCHER       how ranks start on other hosts: pdsh (default), openmpi, mpich, impi,
#                  mvapich or slurm (--launcher)
#   LAUNCHER_ARGS  extra arguments for that launcher, as one string (--launcher_args)
#   MASTER_ADDR    address of the first host, reachable from all of them (default: 127.0.0.1
#                  for a one-host hostfile; else DeepSpeed asks the first host over ssh)
#   MASTER_PORT    port of the process group's store on MASTER_ADDR (default 29500)
#   SSH_PORT       ssh port of the hosts (--ssh_port)
#   PYTHON         the interpreter darkmatter is installed in, on every host (default: python3)
#   LAUNCH_DRY_RUN 1: print the deepspeed command (shell-quoted) and exit
#
# A one-host hostfile runs the ranks here, without ssh. On other hosts DeepSpeed's pdsh path
# passes on only MLFLOW_*, PYTHON* and the accelerator's variables; the object-storage
# endpoint, region and profile darkmatter reads (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3,
# AWS_DEFAULT_REGION, AWS_PROFILE) and DARKMATTER_LOG / DARKMATTER_DEBUG are added here through
# DeepSpeed's env file (DS_ENV_FILE). Credentials are not: give every host its own
# (~/.aws/credentials or an instance role), or put them in ~/.deepspeed_env yourself.
#
# Preemption: DeepSpeed's launcher has no hand-off for it. On SIGTERM its per-host launcher
# sends SIGTERM to each rank's whole process tree (data workers included) and SIGKILLs it 30 s
# later; a preemption checkpoint is reliable under launch/torchrun.sh or srun, not here.
set -euo pipefail

die() {
  echo "launch/deepspeed.sh: error: $*" >&2
  exit 2
}

HOSTFILE=${HOSTFILE:-}
INCLUDE=${INCLUDE:-}
EXCLUDE=${EXCLUDE:-}
LAUNCHER=${LAUNCHER:-pdsh}
LAUNCHER_ARGS=${LAUNCHER_ARGS:-}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
SSH_PORT=${SSH_PORT:-}
PYTHON=${PYTHON:-python3}

[[ -n "$HOSTFILE" ]] || die "set HOSTFILE (one 'HOST slots=N' line per host)"
[[ -f "$HOSTFILE" ]] || die "HOSTFILE: $HOSTFILE does not exist"
[[ -z "$INCLUDE" || -z "$EXCLUDE" ]] || die "set INCLUDE or EXCLUDE, not both"
case "$LAUNCHER" in
  pdsh | openmpi | mpich | impi | mvapich | slurm) ;;
  *) die "LAUNCHER: expected pdsh, openmpi, mpich, impi, mvapich or slurm, got '$LAUNCHER'" ;;
esac
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT: expected a number, got '$MASTER_PORT'"
[[ $# -ge 1 ]] || die "usage: launch/deepspeed.sh CONFIG [a.b=c ...] (see the top of this script)"

hosts=()
while read -r host rest; do
  [[ -z "$host" || "$host" == \#* ]] && continue
  [[ "$rest" =~ ^slots=[0-9]+ ]] || die "HOSTFILE: '$host $rest': expected 'HOST slots=N'"
  hosts+=("$host")
done <"$HOSTFILE"
[[ ${#hosts[@]} -ge 1 ]] || die "HOSTFILE: $HOSTFILE lists no host"

cmd=("$PYTHON" -m deepspeed.launcher.runner --hostfile="$HOSTFILE" --launcher="$LAUNCHER"
  --master_port="$MASTER_PORT")
if [[ ${#hosts[@]} -eq 1 ]]; then
  # One host: DeepSpeed starts the ranks here itself; its ssh check would only get in the way.
  cmd+=(--no_ssh_check --master_addr="${MASTER_ADDR:-127.0.0.1}")
elif [[ -n "$MASTER_ADDR" ]]; then
  cmd+=(--master_addr="$MASTER_ADDR")
fi
[[ -z "$INCLUDE" ]] || cmd+=(--include="$INCLUDE")
[[ -z "$EXCLUDE" ]] || cmd+=(--exclude="$EXCLUDE")
[[ -z "$LAUNCHER_ARGS" ]] || cmd+=(--launcher_args="$LAUNCHER_ARGS")
[[ -z "$SSH_PORT" ]] || cmd+=(--ssh_port="$SSH_PORT")
# --no_local_rank: ranks read LOCAL_RANK from the environment; an inserted --local_rank=N
# would stand before `pretrain` and be taken for the subcommand.
cmd+=(--no_local_rank --module darkmatter.cli pretrain "$@")

# torchrun gives each of several ranks on a host one OpenMP thread unless told otherwise;
# DeepSpeed's launcher does not, and N ranks x all cores oversubscribe the CPUs.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

forward=()
for var in AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 AWS_DEFAULT_REGION AWS_PROFILE DARKMATTER_LOG \
  DARKMATTER_DEBUG OMP_NUM_THREADS; do
  [[ -z "${!var:-}" ]] || forward+=("$var=${!var}")
done

if [[ "${LAUNCH_DRY_RUN:-0}" == 1 ]]; then
  if [[ ${#hosts[@]} -gt 1 ]]; then
    printf '# passed to the other hosts: %s\n' "${forward[@]}"
  fi
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

if [[ ${#hosts[@]} -eq 1 || ${#forward[@]} -eq 0 ]]; then
  exec "${cmd[@]}"
fi
# DeepSpeed reads its env file (DS_ENV_FILE, a name looked up in ~ and in .) when it starts the
# other hosts: one of our own keeps what the user's files say and adds the variables above.
name=${DS_ENV_FILE:-.deepspeed_env}
envfile=$(mktemp "${TMPDIR:-/tmp}/darkmatter-deepspeed-env.XXXXXX")
trap 'rm -f "$envfile"' EXIT
if [[ "$name" == /* ]]; then sources=("$name"); else sources=("$HOME/$name" "./$name"); fi
for f in "${sources[@]}"; do
  [[ ! -f "$f" ]] || cat "$f" >>"$envfile"
done
printf '%s\n' "${forward[@]}" >>"$envfile"
export DS_ENV_FILE=$envfile
# The runner is a child (not exec'd) so the file can be removed afterwards; SIGTERM and SIGINT
# go on to it (its pdsh path then stops the ranks on every host). Job control on (set -m): a
# background command of a script would otherwise start with SIGINT ignored.
set -m
"${cmd[@]}" &
child=$!
trap 'kill -s TERM "$child" 2>/dev/null || true' TERM
trap 'kill -s INT "$child" 2>/dev/null || true' INT
rc=0
while :; do
  wait "$child" && rc=0 || rc=$?
  kill -0 "$child" 2>/dev/null || break # a trap interrupted `wait`: the runner is still running
done
exit "$rc"
