#!/usr/bin/env bash
# A real single-node SLURM on this machine (munge + slurmctld + slurmd, Debian's Slurm 22.05), so the
# farm profile can be tried without a cluster: `snakemake --profile profiles/slurm-local all`.
#
#   scripts/slurm-local.sh start    install what is missing, write the config, start the daemons
#   scripts/slurm-local.sh stop     stop the daemons this script started (by their recorded pids)
#   scripts/slurm-local.sh status   the daemons' pids and `sinfo`
#
# Needs root and apt-get (a container is fine: no systemd, no cgroups). The node gets the machine's
# CPUs and memory and a `gpu` GRES of LORABAKE_SLURM_GPUS (default 2) dummy devices
# /dev/lorabake-gpu<N>: Slurm only checks that the files exist, then hands CUDA_VISIBLE_DEVICES to
# each GPU job, which a CPU torch ignores. State, logs, pids and the job-completion record
# (jobcomp.txt: one line per finished job) live in LORABAKE_SLURM_DIR (default /tmp/lorabake-slurm).
# The config goes to /etc/slurm, the only place Slurm's tools read without SLURM_CONF (which the
# slurm executor plugin strips from job environments); a slurm.conf this script did not write is
# never overwritten.
set -euo pipefail

SCRATCH=${LORABAKE_SLURM_DIR:-/tmp/lorabake-slurm}
GPUS=${LORABAKE_SLURM_GPUS:-2}
PARTITION=main
CONF_DIR=/etc/slurm
MARK="# written by lorabake scripts/slurm-local.sh"
PACKAGES=(munge slurm-client slurmctld slurmd)
NODE=$(hostname -s)

log() { echo "slurm-local: $*" >&2; }
die() { log "$*"; exit 1; }

install_missing() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return
    command -v apt-get > /dev/null || die "apt-get not found; install ${missing[*]} by hand"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" > "$SCRATCH/apt.log" 2>&1 \
        || { cat "$SCRATCH/apt.log" >&2; die "apt-get install failed"; }
}

# The node line is what slurmd itself measures (`slurmd -C`), so the node never drains for
# "Low RealMemory" or a CPU mismatch.
install_plugin() {  # the farm set of the project's venv (not installed by default: envs/requirements-slurm.txt)
    local repo venv
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    venv="$repo/.venv/bin/python"
    [ -x "$venv" ] || return 0
    "$venv" -c "import snakemake_executor_plugin_slurm" 2>/dev/null && return 0
    log "installing the SLURM executor plugin into $repo/.venv (envs/requirements-slurm.txt)"
    "$venv" -m pip install --quiet --disable-pip-version-check -r "$repo/envs/requirements-slurm.txt"
}

node_line() {
    local measured
    measured=$(slurmd -C | head -n 1)
    echo "$measured NodeAddr=127.0.0.1 Gres=gpu:$GPUS State=UNKNOWN"
}

# proctrack/linuxproc + task/none + jobacct_gather/none: nothing here needs cgroups or systemd.
# No slurmdbd: jobcomp/filetxt keeps the record of finished jobs, and MinJobAge keeps them in
# `squeue --states=all` for 10 minutes, which the executor plugin needs to use squeue for status.
write_slurm_conf() {
    cat > "$CONF_DIR/slurm.conf" <<EOF
$MARK
ClusterName=lorabake
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$SCRATCH/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$SCRATCH/state
SlurmdSpoolDir=$SCRATCH/spool
SlurmctldPidFile=$SCRATCH/slurmctld.pid
SlurmdPidFile=$SCRATCH/slurmd.pid
SlurmctldLogFile=$SCRATCH/slurmctld.log
SlurmdLogFile=$SCRATCH/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$(node_line)
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$CONF_DIR/gres.conf" <<EOF
$MARK
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/lorabake-gpu[0-$((GPUS - 1))]
EOF
}

write_config() {
    if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
        die "$CONF_DIR/slurm.conf was not written by this script; not touching it"
    fi
    mkdir -p "$CONF_DIR" "$SCRATCH/state" "$SCRATCH/spool"
    write_slurm_conf
}

# Character devices with NVIDIA's major number where the kernel lets us, plain files otherwise:
# Slurm accepts either, it only stats them.
make_gpu_files() {
    local index
    for ((index = 0; index < GPUS; index++)); do
        local device=/dev/lorabake-gpu$index
        [ -e "$device" ] && continue
        mknod "$device" c 195 "$index" 2>/dev/null || touch "$device"
    done
}

# A pid file counts only while its process is that daemon: a stale pid reused by another program
# must never be signalled.
is_running() {  # name
    local pidfile=$SCRATCH/$1.pid
    [ -f "$pidfile" ] && [ "$(cat "/proc/$(cat "$pidfile")/comm" 2>/dev/null)" = "$1" ]
}

munge_works() { munge -n 2>/dev/null | unmunge > /dev/null 2>&1; }

start_munge() {
    is_running munged && return
    munge_works && return  # a munged of the system's is just as good
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 "$SCRATCH/munge"
    [ -f /etc/munge/munge.key ] || setpriv --reuid=munge --regid=munge --init-groups mungekey --create
    # munged refuses to run as root with a key owned by munge, so it runs as munge, as Debian does.
    setpriv --reuid=munge --regid=munge --init-groups munged \
        --pid-file="$SCRATCH/munge/munged.pid" --log-file="$SCRATCH/munge/munged.log" \
        --seed-file="$SCRATCH/munge/munged.seed"
    ln -sf "$SCRATCH/munge/munged.pid" "$SCRATCH/munged.pid"
    wait_for_pid munged
}

# The daemons fork into the background and write their pid files a moment later.
wait_for_pid() {  # name
    local tries
    for ((tries = 0; tries < 40; tries++)); do
        is_running "$1" && return
        sleep 0.25
    done
    show_logs
    die "$1 did not start"
}

start_slurm() {
    is_running slurmctld || { slurmctld -i; wait_for_pid slurmctld; }
    is_running slurmd || { slurmd; wait_for_pid slurmd; }
}

show_logs() { tail -n 20 "$SCRATCH/slurmctld.log" "$SCRATCH/slurmd.log" >&2 || true; }

# sinfo itself retries for a long while when slurmctld is down, hence the timeout and pid checks.
wait_until_idle() {
    local deadline=$((SECONDS + 30)) name
    while ((SECONDS < deadline)); do
        for name in slurmctld slurmd; do
            is_running "$name" || { show_logs; die "$name exited during start"; }
        done
        if timeout 5 sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then
            return
        fi
        sleep 0.5
    done
    show_logs
    die "node $NODE did not become idle within 30 s"
}

start() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"
    mkdir -p "$SCRATCH"
    install_missing
    install_plugin
    make_gpu_files
    if ! is_running slurmctld || ! is_running slurmd; then
        write_config
    fi
    start_munge
    start_slurm
    wait_until_idle
    log "up: partition $PARTITION on $NODE with gpu:$GPUS; job records in $SCRATCH/jobcomp.txt"
}

stop_daemon() {  # name
    local pidfile=$SCRATCH/$1.pid pid tries
    is_running "$1" || { rm -f "$pidfile"; return; }
    pid=$(cat "$pidfile")
    kill "$pid"
    for ((tries = 0; tries < 40; tries++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$pidfile"
}

stop() {
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    log "stopped"
}

status() {
    local name
    for name in munged slurmctld slurmd; do
        if is_running "$name"; then echo "$name: running (pid $(cat "$SCRATCH/$name.pid"))"
        else echo "$name: stopped"; fi
    done
    is_running slurmctld && sinfo -o "%P %a %D %T %c %m %G %N"
    is_running slurmctld
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
