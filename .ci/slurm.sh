#!/usr/bin/env bash
# A throwaway one-node Slurm cluster on this host, with accounting (slurmdbd on MariaDB) so
# that sacct works as on a real cluster, then tests/test_slurm.py against it.
#
# Needs root (CI runs as root on a fresh Debian machine). Installs munge, slurm-wlm, slurmdbd
# and mariadb-server with apt-get when missing, without letting the packages start their
# system services. Everything it writes lives in one temporary folder; every daemon it starts
# is stopped by its process id on exit, however the script exits. Declares two generic-resource
# GPUs backed by dummy files, so `--gpus=1` jobs are scheduled as on a GPU cluster (and Slurm
# sets CUDA_VISIBLE_DEVICES); the jobs themselves measure on the simulated GPU.
#
# Usage: bash .ci/slurm.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
start=$(date +%s)

if [ "$(id -u)" -ne 0 ]; then
    echo "slurm.sh: needs root (it installs packages and runs the Slurm daemons)" >&2
    exit 1
fi

packages=()
command -v munged >/dev/null || packages+=(munge)
command -v slurmctld >/dev/null || packages+=(slurm-wlm)
command -v slurmdbd >/dev/null || packages+=(slurmdbd)
command -v mariadbd >/dev/null || packages+=(mariadb-server)
if [ ${#packages[@]} -gt 0 ]; then
    echo "slurm.sh: installing ${packages[*]}"
    # policy-rc.d 101: package scripts must not start munge/mariadb/slurm system services,
    # which this script would then leave running.
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    [ "$own_policy" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
    echo "slurm.sh: installed in $(( $(date +%s) - start )) s"
fi
python3 -c "import snakemake_executor_plugin_slurm" 2>/dev/null || {
    echo "slurm.sh: the Snakemake Slurm executor plugin is missing: pip install -e '.[slurm]'" >&2
    exit 1
}

if [ -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then
    echo "slurm.sh: /etc/slurm/slurm.conf exists: this host has a Slurm of its own; run this on a machine without one" >&2
    exit 1
fi
mkdir -p /etc/slurm

tmp=$(mktemp -d /tmp/phasewatt-slurm.XXXXXX)
linked_conf=0
pids=()
names=()
tests=
cleanup() {
    status=$?
    set +e
    if [ -n "$tests" ] && kill -0 "$tests" 2>/dev/null; then
        kill -TERM -- "-$tests" 2>/dev/null
        wait "$tests" 2>/dev/null
    fi
    # Jobs still in the cluster: cancel them while slurmctld is up (a job's slurmstepd would
    # outlive slurmd), and wait until they are gone.
    if [ -n "${SLURM_CONF:-}" ] && [ -n "$(timeout 10 squeue -h -o %i 2>/dev/null)" ]; then
        timeout 10 scancel --full $(timeout 10 squeue -h -o %i) 2>/dev/null
        for _ in $(seq 100); do [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
    fi
    # Newest first: slurmd, slurmctld, slurmdbd, MariaDB, munged.
    for (( i=${#pids[@]}-1; i>=0; i-- )); do
        pid=${pids[$i]}
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "slurm.sh: ${names[$i]} (pid $pid) ignored SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
        wait "$pid" 2>/dev/null
    done
    if [ "$status" -ne 0 ]; then
        for log in "$tmp"/slurm*.log "$tmp"/munged.log "$tmp"/mariadb.log; do
            [ -f "$log" ] && { echo "--- $log (last lines)"; tail -n 15 "$log"; }
        done
    fi
    [ "$linked_conf" -eq 1 ] && rm -f /etc/slurm/slurm.conf
    rm -rf "$tmp"
    echo "slurm.sh: done in $(( $(date +%s) - start )) s (exit $status); all daemons stopped"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

launch() {  # launch NAME COMMAND...: start a daemon in the foreground mode, in the background
    local name=$1
    shift
    "$@" >"$tmp/$name.out" 2>&1 &
    pids+=($!)
    names+=("$name")
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...: poll COMMAND until it succeeds
    local what=$1 seconds=$2
    shift 2
    for _ in $(seq $(( seconds * 5 ))); do
        "$@" >/dev/null 2>&1 && return 0
        for (( i=0; i<${#pids[@]}; i++ )); do
            kill -0 "${pids[$i]}" 2>/dev/null || { echo "slurm.sh: ${names[$i]} exited early" >&2; cat "$tmp/${names[$i]}.out" >&2; return 1; }
        done
        sleep 0.2
    done
    echo "slurm.sh: $what not ready after $seconds s" >&2
    return 1
}

read -r port_ctld port_slurmd port_dbd port_db < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
)
host=$(hostname -s)
cluster=phasewatt-ci
account=phasewatt
partition=gpu
mkdir -p "$tmp/state" "$tmp/spool" "$tmp/dev" "$tmp/db"
# slurmd wants the GPUs' device files to be character devices: twins of /dev/null (1,3).
if mknod "$tmp/dev/nvidia0" c 1 3 2>/dev/null && mknod "$tmp/dev/nvidia1" c 1 3 2>/dev/null; then
    gpu_files="$tmp/dev/nvidia[0-1]"
else
    gpu_files="/dev/null,/dev/zero"
fi

# munge: a private key and socket, so a system munged (if any) is neither used nor disturbed.
head -c 1024 /dev/urandom >"$tmp/munge.key"
chmod 400 "$tmp/munge.key"
launch munged munged --foreground --force --key-file="$tmp/munge.key" --socket="$tmp/munge.sock" \
    --pid-file="$tmp/munged.pid" --log-file="$tmp/munged.log" --seed-file="$tmp/munged.seed"
wait_for munged 10 test -S "$tmp/munge.sock"

# MariaDB for slurmdbd: TCP on localhost only, no grant tables (a throwaway database).
mariadb-install-db --no-defaults --datadir="$tmp/db" --user=root --skip-test-db \
    --auth-root-authentication-method=normal >"$tmp/mariadb-install.log" 2>&1
launch mariadbd mariadbd --no-defaults --datadir="$tmp/db" --user=root --skip-grant-tables \
    --bind-address=127.0.0.1 --port="$port_db" --socket="$tmp/mysql.sock" --pid-file="$tmp/mysql.pid" \
    --log-error="$tmp/mariadb.log" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --skip-log-bin
wait_for MariaDB 60 mariadb-admin --no-defaults --socket="$tmp/mysql.sock" ping

cat >"$tmp/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$tmp/munge.sock
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$port_dbd
SlurmUser=root
LogFile=$tmp/slurmdbd.log
PidFile=$tmp/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$port_db
StorageUser=root
StorageLoc=slurm_acct_db
EOF
chmod 600 "$tmp/slurmdbd.conf"

# The node as slurmd sees it (CPUs, sockets, cores), with memory below the machine's.
node=$(slurmd -C | head -n 1 | sed 's/ RealMemory=[0-9]*//')
mem_mb=$(awk '/MemTotal/ {m = int($2 / 1024 / 2); print (m > 8192 ? 8192 : m)}' /proc/meminfo)
cat >"$tmp/slurm.conf" <<EOF
ClusterName=$cluster
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port_ctld
SlurmdPort=$port_slurmd
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$tmp/munge.sock
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/slurmctld.log
SlurmdLogFile=$tmp/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$port_dbd
# For connections to slurmdbd, this names the munge socket (it is no password).
AccountingStoragePass=$tmp/munge.sock
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=300
GresTypes=gpu
$node RealMemory=$mem_mb Gres=gpu:2 NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$partition Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$tmp/gres.conf" <<EOF
NodeName=$host Name=gpu File=$gpu_files
EOF
export SLURM_CONF=$tmp/slurm.conf
# The Slurm jobstep plugin drops SLURM_* variables, SLURM_CONF included, before its srun
# inside the job; that srun then finds the cluster through the default path, for this run.
ln -s "$SLURM_CONF" /etc/slurm/slurm.conf
linked_conf=1

# slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF.
launch slurmdbd slurmdbd -D
wait_for slurmdbd 60 timeout 10 sacctmgr -n list cluster
timeout 20 sacctmgr -i add cluster "$cluster" >/dev/null
timeout 20 sacctmgr -i add account "$account" Cluster="$cluster" Description=ci Organization=ci >/dev/null
timeout 20 sacctmgr -i add user root Account="$account" Cluster="$cluster" >/dev/null

launch slurmctld slurmctld -D -i
wait_for slurmctld 30 timeout 10 scontrol ping
launch slurmd slurmd -D
wait_for "the node" 30 bash -c '[ "$(sinfo -h -o %T)" = idle ]'
echo "slurm.sh: one-node cluster up in $(( $(date +%s) - start )) s: $(sinfo -h -o '%P %D %T %G')"

# In a session of its own, so that cleanup can end it with everything it started.
PHASEWATT_SLURM_CLUSTER=up PHASEWATT_SLURM_ACCOUNT=$account PHASEWATT_SLURM_PARTITION=$partition \
    setsid python3 -m pytest -q -p no:cacheprovider "$repo/tests/test_slurm.py" "$@" &
tests=$!
wait "$tests"
