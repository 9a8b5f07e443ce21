#!/usr/bin/env bash
# Start a throw-away single-node SLURM cluster (with accounting), run one
# command against it, then tear everything down again.
#
#   scripts/slurm_cluster.sh [--install] [--] COMMAND [ARGS...]
#
#   --install   first apt-get install (quietly, noninteractively) slurmctld
#               slurmd slurm-client slurmdbd munge mariadb-server
#
# What it starts, each from a fresh temporary directory /tmp/slurmc.XXXXXX
# (config, state, logs, sockets; apart from --install nothing under /etc or
# /run is touched and no system service is used, so it needs no systemd and
# does not clash with a SLURM/munge/MariaDB already on the machine): munged
# (own key and socket), MariaDB (own data directory, unix socket only),
# slurmdbd (the cluster registered with `sacctmgr -i add cluster`), slurmctld
# and slurmd on free local ports; all as root (SlurmUser=root) except munged
# and mariadbd, which run as munge and mysql.  The node (NodeAddr 127.0.0.1)
# is sized from `slurmd -C`; one partition "debug", Default=YES, MaxTime
# unlimited, DefMemPerCPU = memory/CPUs (so jobs share the node),
# EnforcePartLimits=ALL (a job that can never fit is rejected by sbatch);
# jobs can be requeued (JobRequeue=1; a requeued job may start again after
# about 10 s, AuthInfo cred_expire=10, instead of 120 s), KillWait=10,
# MinJobAge=10.
# It waits until `sinfo` shows the node idle and `sacct` answers, prints one
# line with the start-up time, then runs COMMAND with these exported:
#
#   SLURM_CONF               the cluster's slurm.conf (sbatch, sacct, ... use it)
#   LMTK_SLURM_CLUSTER       cluster name          LMTK_SLURM_PARTITION  partition
#   LMTK_SLURM_NODE          node name             LMTK_SLURM_CPUS       its CPUs
#   LMTK_SLURM_MEM_MB        its RealMemory (MB)   LMTK_SLURM_DIR        temp dir
#
# On exit (COMMAND done, a failure, Ctrl-C, SIGTERM/SIGHUP) a trap cancels the
# jobs, stops every daemon it started, kills what is left of the jobs and of
# COMMAND's own background processes, and removes the temp dir; a SIGTERM is
# passed on to COMMAND first.  (Only SIGKILL of this script leaves them behind.)
# The daemons' logs are in $LMTK_SLURM_DIR/log while COMMAND runs.
#
# Exit status:
#   COMMAND's own status     when the cluster came up and COMMAND ran
#   77   the cluster cannot be had here: not root, not Linux, no apt-get for
#        --install, the install failed, or the SLURM/munge/MariaDB programs are
#        missing (run with --install).  One line on stderr says which, and
#        COMMAND is NOT run, so a caller can treat 77 as "skip".
#   70   the daemons were there but the cluster did not come up in time; the
#        tails of the daemons' logs are printed.  COMMAND is not run.
#   2    usage error
#
# Environment knobs: SLURM_CLUSTER_NAME_FOR_TEST (default lmtk),
# SLURM_CLUSTER_EXTRA_CONF (lines appended to slurm.conf; a key given again
# there wins, e.g. EnforcePartLimits=NO to see such jobs pend instead),
# SLURM_CLUSTER_CPUS / SLURM_CLUSTER_MEM_MB (declare a node of that size instead
# of the machine's, e.g. for jobs that ask for more than it has; nothing enforces
# it), SLURM_CLUSTER_START_TIMEOUT (seconds per start-up stage, default 60),
# SLURM_CLUSTER_KEEP=1 (leave the temp dir, e.g. to read the logs).
set -uo pipefail

SKIP=77
START_FAILED=70
me=slurm_cluster

say() { printf '%s: %s\n' "$me" "$*" >&2; }
skip() { say "SKIP: $*"; exit "$SKIP"; }
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

install=0
while [ $# -gt 0 ]; do
    case "$1" in
        --install) install=1; shift ;;
        --) shift; break ;;
        -h|--help) usage ;;
        -*) say "unknown option $1"; usage ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || { say "no COMMAND given"; usage; }

now() { echo "${EPOCHREALTIME:-$(date +%s.%N)}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(uname -s)" = Linux ] || skip "needs Linux (this is $(uname -s))"
[ "$(id -u)" = 0 ] || skip "needs root (to run munged/MariaDB/slurmd as their users); uid is $(id -u)"

packages=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
if [ "$install" = 1 ]; then
    command -v apt-get >/dev/null || skip "--install needs apt-get, which is not here"
    t0=$(now)
    log=$(mktemp /tmp/slurm_cluster_install.XXXXXX)
    # Keep the packages' maintainer scripts from starting their system services.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 \
        --no-install-recommends "${packages[@]}" >"$log" 2>&1
    rc=$?
    if [ "$rc" != 0 ] && grep -qiE 'unable to locate|has no installation candidate' "$log"; then
        # a stale or empty package list: refresh it once and retry
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 \
            --no-install-recommends "${packages[@]}" >>"$log" 2>&1
        rc=$?
    fi
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    if [ "$rc" != 0 ]; then
        last=$(grep -v '^\s*$' "$log" | tail -n 1)
        rm -f "$log"
        skip "apt-get install ${packages[*]} failed (status $rc): $last"
    fi
    rm -f "$log"
    say "installed ${packages[*]} in $(since "$t0")s"
fi

need() {
    local p
    for p in "$@"; do command -v "$p" >/dev/null && { echo "$p"; return 0; }; done
    return 1
}
PATH=$PATH:/usr/sbin:/sbin
missing=()
for p in slurmctld slurmd slurmdbd sacctmgr sbatch sinfo sacct scancel squeue munged setpriv; do
    command -v "$p" >/dev/null || missing+=("$p")
done
mysqld=$(need mariadbd mysqld) || missing+=(mariadbd)
install_db=$(need mariadb-install-db mysql_install_db) || missing+=(mariadb-install-db)
id munge >/dev/null 2>&1 || missing+=("user munge")
id mysql >/dev/null 2>&1 || missing+=("user mysql")
[ ${#missing[@]} = 0 ] || skip "not installed: ${missing[*]} (run with --install, or apt-get install ${packages[*]})"

# ---------------------------------------------------------------- set-up ----
t_start=$(now)
base=$(mktemp -d /tmp/slurmc.XXXXXX) || skip "cannot make a temp dir under /tmp"
chmod 755 "$base"
export LMTK_SLURM_DIR=$base          # marks every process we start (see cleanup)
cluster=$(echo "${SLURM_CLUSTER_NAME_FOR_TEST:-lmtk}" | tr '[:upper:]' '[:lower:]')
partition=debug
timeout=${SLURM_CLUSTER_START_TIMEOUT:-60}
host=$(hostname -s)
conf=$base/etc/slurm.conf
mkdir -p "$base"/{etc,log,state,spool,run} "$base"/munge "$base"/munge-socket "$base"/mysql/data

pids=()      # daemons in start order: "name:pid"
cmd_pid=""   # COMMAND, once it runs

start_daemon() { # NAME CMD... : run in its own session (Ctrl-C goes to COMMAND only)
    local name=$1; shift
    setsid "$@" >>"$base/log/$name.out" 2>&1 </dev/null &
    pids+=("$name:$!")
}

alive() { kill -0 "$1" 2>/dev/null; }

stop_pid() { # PID [GRACE_SECONDS]
    local pid=$1 grace=${2:-10} i
    alive "$pid" || { wait "$pid" 2>/dev/null; return 0; }
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < grace * 10; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

marked_pids() { # processes whose environment carries LMTK_SLURM_DIR=$base, and their descendants
    local f pid seeds=() all
    for f in /proc/[0-9]*/environ; do
        pid=${f#/proc/}; pid=${pid%/environ}
        [ "$pid" = $$ ] || [ "$pid" = "$BASHPID" ] && continue
        { tr '\0' '\n' <"$f"; } 2>/dev/null | grep -qxF "LMTK_SLURM_DIR=$base" && seeds+=("$pid")
    done
    [ ${#seeds[@]} = 0 ] && return 0
    # "pid ppid" of every process, from /proc (procps may not be installed)
    all=$(for f in /proc/[0-9]*/stat; do
              { read -r line <"$f"; } 2>/dev/null || continue
              pid=${f#/proc/}; pid=${pid%/stat}
              rest=${line##*) }                 # "STATE PPID ..." after "(comm) "
              rest=${rest#* }
              echo "$pid ${rest%% *}"
          done)
    awk -v seeds="${seeds[*]}" -v self=$$ -v me2="$BASHPID" '
        { parent[$1] = $2; pids[NR] = $1 }
        END {
            n = split(seeds, s, " "); for (i = 1; i <= n; i++) keep[s[i]] = 1
            do { changed = 0
                 for (i in pids) { p = pids[i]
                     if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } }
            } while (changed)
            for (p in keep) if (p != self && p != me2) print p
        }' <<<"$all"
}

cleanup() {
    local rc=$? entry i leftovers
    trap - EXIT
    trap '' INT TERM HUP     # a second Ctrl-C must not cut the tear-down short
    [ -n "${exit_status:-}" ] && rc=$exit_status
    if [ ${#pids[@]} -gt 0 ]; then
        # cancel what is still queued or running (only ever on our own
        # slurmctld, never on one that SLURM_CONF did not point at), give it a moment
        if [ -n "${ctld_pid:-}" ] && alive "$ctld_pid"; then
            local jobs
            jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
            if [ -n "${jobs// /}" ]; then
                timeout 10 scancel $jobs >/dev/null 2>&1
                for ((i = 0; i < 50; i++)); do
                    [ -z "$(squeue -h -t R,CG -o %A 2>/dev/null)" ] && break
                    sleep 0.1
                done
            fi
        fi
        for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
            entry=${pids[$i]}
            stop_pid "${entry#*:}" 10
        done
    fi
    # job steps (slurmstepd) and their tasks outlive slurmd: kill what is left
    leftovers=$(marked_pids)
    if [ -n "$leftovers" ]; then
        kill -KILL $leftovers 2>/dev/null
        sleep 0.2
    fi
    if [ "${SLURM_CLUSTER_KEEP:-0}" = 1 ]; then
        say "kept $base"
    else
        rm -rf "$base"
    fi
    exit "$rc"
}
on_signal() { # SIGNAL STATUS
    local i
    trap '' INT TERM HUP
    exit_status=$2
    if [ -n "${cmd_pid:-}" ] && alive "$cmd_pid"; then
        # A Ctrl-C at a terminal reaches COMMAND by itself (same process group):
        # give it a moment to act on that; a TERM/HUP is passed on to it.
        [ "$1" = INT ] || kill -"$1" "$cmd_pid" 2>/dev/null
        for ((i = 0; i < 50; i++)); do alive "$cmd_pid" || break; sleep 0.1; done
        stop_pid "$cmd_pid" 5
    fi
    say "got SIG$1: stopping the cluster"
    exit "$2"
}
trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

fail_start() {
    local f
    say "the cluster did not come up: $*"
    for f in "$base"/log/*; do
        [ -s "$f" ] || continue
        printf -- '----- %s (last 20 lines) -----\n' "${f#$base/}" >&2
        tail -n 20 "$f" >&2
    done
    if command -v sinfo >/dev/null && [ -f "$conf" ]; then
        printf -- '----- sinfo -R -----\n' >&2
        SLURM_CONF=$conf timeout 5 sinfo -R >&2 2>&1
    fi
    exit_status=$START_FAILED
    exit "$START_FAILED"
}

wait_for() { # WHAT PID_TO_WATCH CMD... : poll CMD until it succeeds
    local what=$1 watch=$2 deadline
    shift 2
    deadline=$(( $(date +%s) + timeout ))
    until "$@" >/dev/null 2>&1; do
        [ -n "${bad_state:-}" ] && fail_start "$bad_state"
        [ -n "$watch" ] && ! alive "$watch" && fail_start "$what exited"
        [ "$(date +%s)" -ge "$deadline" ] && fail_start "timed out after ${timeout}s waiting for $what"
        sleep 0.2
    done
}

t_lap=$t_start laps=""
lap() { laps="$laps $1 $(since "$t_lap")s"; t_lap=$(now); }

last_pid() { local e=${pids[-1]}; echo "${e#*:}"; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
next_free_port() { # FROM: first port >= FROM that nothing listens on and we did not take
    local p=$1
    while ! port_free "$p" || [[ " ${taken_ports:-} " == *" $p "* ]]; do p=$((p + 1)); done
    taken_ports="${taken_ports:-} $p"
    echo "$p"
}
ctld_port=$(next_free_port 6817)
slurmd_port=$(next_free_port $((ctld_port + 1)))
dbd_port=$(next_free_port $((slurmd_port + 1)))

# ----------------------------------------------------------------- munge ----
chown munge: "$base/munge" "$base/munge-socket"
chmod 700 "$base/munge"; chmod 755 "$base/munge-socket"   # munged wants the socket's dir o+x
dd if=/dev/urandom of="$base/munge/munge.key" bs=1024 count=1 status=none
chown munge: "$base/munge/munge.key"; chmod 400 "$base/munge/munge.key"
munge_socket=$base/munge-socket/munge.socket
touch "$base/log/munged.log"; chown munge: "$base/log/munged.log"
start_daemon munged setpriv --reuid=munge --regid="$(id -g munge)" --init-groups \
    munged --foreground --key-file="$base/munge/munge.key" --socket="$munge_socket" \
    --pid-file="$base/munge/munged.pid" --seed-file="$base/munge/munged.seed" \
    --log-file="$base/log/munged.log" --num-threads=2
wait_for "munged" "$(last_pid)" test -S "$munge_socket"
lap munged

# --------------------------------------------------------------- MariaDB ----
mysql_dir=$base/mysql
mysql_socket=$mysql_dir/mysqld.sock
chown -R mysql: "$mysql_dir"
"$install_db" --no-defaults --user=mysql --datadir="$mysql_dir/data" --skip-test-db \
    --auth-root-authentication-method=socket --skip-name-resolve \
    >"$base/log/mariadb-install-db.out" 2>&1 \
    || fail_start "$install_db failed"
start_daemon mariadbd "$mysqld" --no-defaults --user=mysql --datadir="$mysql_dir/data" \
    --socket="$mysql_socket" --pid-file="$mysql_dir/mysqld.pid" --skip-networking \
    --log-error="$base/log/mariadbd.log" --skip-name-resolve \
    --innodb-buffer-pool-size=256M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900
    # (the sizes slurmdbd asks for; with less it logs "Database settings not recommended values")
wait_for "MariaDB" "$(last_pid)" test -S "$mysql_socket"
lap MariaDB

# ------------------------------------------------------------ slurm conf ----
# The node as slurmd sees it: "NodeName=x CPUs=2 Boards=1 ... RealMemory=23000"
hw=$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=') || true
[ -n "$hw" ] || fail_start "slurmd -C printed no NodeName line"
hw=${hw#NodeName=* }
cpus=$(sed -n 's/.*\bCPUs=\([0-9]*\).*/\1/p' <<<"$hw")
mem=$(sed -n 's/.*\bRealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
overrides=""
if [ -n "${SLURM_CLUSTER_CPUS:-}${SLURM_CLUSTER_MEM_MB:-}" ]; then
    # a node bigger (or smaller) than the machine: slurmd takes slurm.conf's word for it
    cpus=${SLURM_CLUSTER_CPUS:-$cpus} mem=${SLURM_CLUSTER_MEM_MB:-$mem}
    [[ "$cpus" =~ ^[1-9][0-9]*$ && "$mem" =~ ^[1-9][0-9]*$ ]] \
        || fail_start "SLURM_CLUSTER_CPUS/SLURM_CLUSTER_MEM_MB must be positive integers"
    hw="CPUs=$cpus RealMemory=$mem"
    overrides="SlurmdParameters=config_overrides"
fi

cat >"$conf" <<EOF
# written by scripts/slurm_cluster.sh for a throw-away test cluster
ClusterName=$cluster
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire (default 120 s) is also how long a requeued job waits before it may start again
AuthInfo=socket=$munge_socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$base/state
SlurmdSpoolDir=$base/spool/%n
SlurmctldPidFile=$base/run/slurmctld.pid
SlurmdPidFile=$base/run/slurmd.pid
SlurmctldLogFile=$base/log/slurmctld.log
SlurmdLogFile=$base/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default a job is given all the node's memory, and so runs alone
DefMemPerCPU=$((mem / cpus))
SchedulerType=sched/backfill
# look at the queue every few seconds (defaults 60 s and 30 s): a requeued job
# or one whose BeginTime passed starts within seconds
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
JobRequeue=1
# reject at sbatch what can never run here (too many CPUs/nodes: "More processors
# requested than permitted", "Node count specification invalid") instead of
# leaving it PENDING forever (Reason=PartitionConfig / PartitionNodeLimit)
EnforcePartLimits=ALL
KillWait=10
MinJobAge=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
# the munge socket for talking to slurmdbd (AuthInfo covers only the rest)
AccountingStoragePass=$munge_socket
# reads /proc (no cgroups needed); sampled every 2 s, so that even a job of a
# few seconds gets MaxRSS/AveCPU in sacct (with the default 30 s they stay empty)
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
JobCompType=jobcomp/none
$overrides
NodeName=$host NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=$partition Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
if [ -n "${SLURM_CLUSTER_EXTRA_CONF:-}" ]; then
    printf '# from SLURM_CLUSTER_EXTRA_CONF\n%s\n' "$SLURM_CLUSTER_EXTRA_CONF" >>"$conf"
fi

cat >"$base/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$munge_socket
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
DebugLevel=info
LogFile=$base/log/slurmdbd.log
PidFile=$base/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
chmod 600 "$base/etc/slurmdbd.conf"
export SLURM_CONF=$conf

# ----------------------------------------------------------------- slurm ----
# StorageUser=root reaches MariaDB through its unix socket (unix_socket auth);
# the client library takes the socket's path from MYSQL_UNIX_PORT.
MYSQL_UNIX_PORT=$mysql_socket start_daemon slurmdbd slurmdbd -D
wait_for "slurmdbd" "$(last_pid)" sacctmgr -n list cluster
sacctmgr -i add cluster "$cluster" >"$base/log/sacctmgr.out" 2>&1 \
    || fail_start "sacctmgr -i add cluster $cluster failed: $(tail -n 1 "$base/log/sacctmgr.out")"
lap slurmdbd

start_daemon slurmctld slurmctld -D -i
ctld_pid=$(last_pid)
wait_for "slurmctld" "$ctld_pid" scontrol ping
lap slurmctld
mkdir -p "$base/spool/$host"
start_daemon slurmd slurmd -D
slurmd_pid=$(last_pid)
node_idle() {
    alive "$ctld_pid" || return 1
    local s
    s=$(sinfo -h -N -n "$host" -o %t 2>/dev/null)
    case "$s" in
        idle) return 0 ;;
        drain*|drng|inval|fail*) bad_state="node $host is $s" ;;
    esac
    return 1
}
wait_for "node $host to be idle" "$slurmd_pid" node_idle
lap slurmd
wait_for "sacct" "" sacct -n -X -S now-1hours

export LMTK_SLURM_CLUSTER=$cluster LMTK_SLURM_PARTITION=$partition LMTK_SLURM_NODE=$host \
    LMTK_SLURM_CPUS=$cpus LMTK_SLURM_MEM_MB=$mem
say "cluster '$cluster' up in $(since "$t_start")s (${laps# }) (node $host: $cpus CPUs, ${mem} MB; partition $partition; SLURM_CONF=$conf)"

# ----------------------------------------------------------------- run it ----
# COMMAND runs in the background, with our stdin and with SIGINT/SIGQUIT back at
# their defaults, so that a SIGTERM/SIGINT sent to this script alone is acted on
# at once (bash runs traps only between foreground commands) -- see on_signal.
( trap - INT QUIT; exec "$@" ) <&0 &
cmd_pid=$!
wait "$cmd_pid"
exit_status=$?
exit "$exit_status"
