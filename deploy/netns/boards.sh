#!/usr/bin/env bash
# boards.sh: simulated edge boards in Linux network namespaces, for trying tvmpipe on one machine.
#
# Usage (as root; needs iproute2's `ip` and `tc`):
#   boards.sh up N [--rate R[,R...]] [--cpu C[,C...]] [--burst B] [--latency L]
#                                                create N boards (recreates the set)
#   boards.sh down                               remove everything of the set (idempotent)
#   boards.sh shape BOARD RATE [--burst B] [--latency L]   limit a board's link, both directions
#   boards.sh unshape BOARD                      remove that limit
#   boards.sh cpu BOARD SHARE|none               set a board's CPU quota (cores; none: no limit)
#   boards.sh cut BOARD | restore BOARD          take a board's link down / up again
#   boards.sh list                               namespaces, addresses, shaping, CPU quota
#   boards.sh exec BOARD CMD [ARG...]            run a command inside a board (and its cgroup)
# Every command also takes --prefix P (default $TVMPIPE_NETNS_PREFIX or "tvpnet"; 1-10 of
# [a-z0-9]) and `up` takes --subnet A.B.C (default $TVMPIPE_NETNS_SUBNET or 10.77.0), so that
# several sets can live side by side. BOARD is b1..bN (or just its number), or "tr".
# --rate and --cpu take one value for every board or one per board (comma-separated, "none"
# for a board left alone): `up 3 --rate 20mbit,100mbit,5mbit --cpu 1.0,0.4,1.0`.
#
# What `up N` builds (S = the subnet, P = the prefix):
#   root namespace: bridge P-br with S.1/24, the controller's address (use it as client_host)
#   namespace P-tr: S.2 on eth0, a host for TVM's tracker
#   namespace P-bK: S.(10+K) on eth0, board K (K = 1..N), loopback up
#   each namespace is joined to the bridge by a veth pair: P-tr / P-bK in the root namespace,
#   eth0 inside. The namespaces have no default route: they reach only the subnet.
#
# Shaping uses `tc ... tbf` (there is no netem): on the root end of the veth for traffic
# towards the board, and on eth0 inside the board for traffic from it. RATE, --burst and
# --latency take tc's units (8mbit, 32kb, 50ms; defaults: burst 32kb, latency 50ms). A link
# loaded both ways delivers about 85-95% of RATE as TCP payload (ACKs queue behind data).
#
# CPU: --cpu gives each board a cgroup (v1 cpu controller, $TVMPIPE_CGROUP_CPU or
# /sys/fs/cgroup/cpu) named tvmpipe-P-bK, with cpu.cfs_period_us 10000 and cpu.cfs_quota_us
# SHARE x 10000: 0.4 is 40 % of one core, 2 two cores' worth. Periods of 10 ms (the kernel's
# default is 100 ms) make a board compute at its share's pace on the time scale of a stage, as a
# slower CPU would, instead of at full speed until its share is spent and then not at all. `exec` starts its command in the
# board's cgroup, so a worker and the session processes it forks all share the board's quota.
# `cpu BOARD` creates the cgroup if needed and moves the board's running processes into it.
# `down` ends every process in the set's namespaces and cgroups, then removes the cgroups.
#
# Example session (or all in one: deploy/netns/boards.py, which also starts the processes):
#   sudo deploy/netns/boards.sh up 3 --rate 20mbit,20mbit,5mbit --cpu 1.0,1.0,0.4
#   sudo deploy/netns/boards.sh exec tr python -m tvm.exec.rpc_tracker --host 0.0.0.0 \
#        --port 9190 &
#   sudo deploy/netns/boards.sh exec b1 tvmpipe-worker --host 10.77.0.11 --port 9090 \
#        --tracker 10.77.0.2:9190 --key big --custom-addr 10.77.0.11 &
#   ...  PipelineModule(lib, tracker=("10.77.0.2", 9190), client_host="10.77.0.1")
#   sudo deploy/netns/boards.sh down      # also ends every process left in the namespaces
set -euo pipefail

PREFIX="${TVMPIPE_NETNS_PREFIX:-tvpnet}"
SUBNET="${TVMPIPE_NETNS_SUBNET:-10.77.0}"
BURST="32kb"
LATENCY="50ms"
RATE=""
CPU=""
CGROUP_CPU="${TVMPIPE_CGROUP_CPU:-/sys/fs/cgroup/cpu}"
CFS_PERIOD_US=10000

die() {
    echo "boards.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

check_names() {
    [[ "$PREFIX" =~ ^[a-z0-9]{1,10}$ ]] || die "prefix '$PREFIX' must be 1-10 of [a-z0-9]"
    [[ "$SUBNET" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] ||
        die "subnet '$SUBNET' must be the first three octets, like 10.77.0"
}

# namespace name of a board argument: b2, 2 or tr
namespace_of() {
    case "$1" in
    tr) echo "$PREFIX-tr" ;;
    b[0-9]*) echo "$PREFIX-$1" ;;
    [0-9]*) echo "$PREFIX-b$1" ;;
    *) die "unknown board '$1': use b1..bN, a number, or tr" ;;
    esac
}

our_namespaces() {
    ip netns list | awk '{print $1}' | grep -E "^$PREFIX-(tr|b[0-9]+)$" || true
}

# cgroup directory of a board's namespace (P-bK -> $CGROUP_CPU/tvmpipe-P-bK)
cgroup_of() {
    echo "$CGROUP_CPU/tvmpipe-$1"
}

our_cgroups() {
    [[ -d "$CGROUP_CPU" ]] || return 0
    find "$CGROUP_CPU" -mindepth 1 -maxdepth 1 -type d -name "tvmpipe-$PREFIX-*" |
        grep -E "/tvmpipe-$PREFIX-b[0-9]+$" || true
}

need_cpu_controller() {
    [[ -f "$CGROUP_CPU/cpu.cfs_quota_us" ]] ||
        die "no cgroup v1 cpu controller at $CGROUP_CPU (cpu.cfs_quota_us missing): --cpu and" \
            "'cpu' need one (mount -t cgroup -o cpu cgroup $CGROUP_CPU, or set TVMPIPE_CGROUP_CPU)"
}

# quota_of SHARE: cpu.cfs_quota_us for a share of one core (none: -1, no limit)
quota_of() {
    local share="$1"
    if [[ "$share" == none ]]; then
        echo -1
        return
    fi
    [[ "$share" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] ||
        die "CPU share '$share' must be a number of cores like 1.0 or 0.4, or none"
    local quota
    quota="$(awk -v s="$share" -v p="$CFS_PERIOD_US" 'BEGIN { printf "%d", s * p + 0.5 }')"
    ((quota >= 1000)) || die "CPU share '$share' is below the minimum of 0.1 (a 1 ms quota per 10 ms period)"
    echo "$quota"
}

# set_cpu NAMESPACE SHARE: the namespace's cgroup (created if missing) limited to SHARE;
# processes already in the namespace are moved into it
set_cpu() {
    local ns="$1" quota cgroup pid
    quota="$(quota_of "$2")"
    cgroup="$(cgroup_of "$ns")"
    if [[ ! -d "$cgroup" ]]; then
        mkdir "$cgroup" || die "cannot create cgroup $cgroup"
    fi
    echo "$CFS_PERIOD_US" >"$cgroup/cpu.cfs_period_us"
    echo "$quota" >"$cgroup/cpu.cfs_quota_us"
    for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
        echo "$pid" >"$cgroup/cgroup.procs" 2>/dev/null || true # it may have just exited
    done
}

# per_board LIST COUNT WHAT: LIST (one value, or COUNT comma-separated) as COUNT lines
per_board() {
    local list="$1" count="$2" what="$3" values k
    IFS=, read -r -a values <<<"$list"
    if ((${#values[@]} == 1)); then
        for ((k = 0; k < count; k++)); do echo "${values[0]}"; done
    elif ((${#values[@]} == count)); then
        printf '%s\n' "${values[@]}"
    else
        die "$what '$list' has ${#values[@]} values: give one, or one per board ($count)"
    fi
}

our_links() {
    ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' |
        grep -E "^$PREFIX-(br|tr|b[0-9]+)$" || true
}

disable_ipv6() {
    # Quiet links: no IPv6 neighbour discovery adding to the byte counters.
    local conf="/proc/sys/net/ipv6/conf/$1/disable_ipv6"
    if [[ -w "$conf" ]]; then echo 1 >"$conf"; fi
}

shape_link() {
    local ns="$1" rate="$2" host_if="${1}"
    tc qdisc replace dev "$host_if" root tbf rate "$rate" burst "$BURST" latency "$LATENCY"
    ip netns exec "$ns" tc qdisc replace dev eth0 root tbf rate "$rate" burst "$BURST" \
        latency "$LATENCY"
}

unshape_link() {
    local ns="$1"
    tc qdisc del dev "$ns" root 2>/dev/null || true
    ip netns exec "$ns" tc qdisc del dev eth0 root 2>/dev/null || true
}

add_host() {
    # add_host NAMESPACE ADDRESS: a namespace joined to the bridge by a veth pair
    local ns="$1" address="$2"
    ip netns add "$ns"
    ip link add "$ns" type veth peer name eth0 netns "$ns"
    disable_ipv6 "$ns"
    ip link set "$ns" master "$PREFIX-br" up
    ip netns exec "$ns" sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6' 2>/dev/null ||
        true
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip addr add "$address/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
}

cmd_down() {
    local ns pids link
    for ns in $(our_namespaces); do
        # Every process still inside one of our namespaces was started there for this set.
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        if [[ -n "$pids" ]]; then
            # shellcheck disable=SC2086  # one pid per word
            kill -TERM $pids 2>/dev/null || true
            for _ in $(seq 50); do
                pids="$(ip netns pids "$ns" 2>/dev/null || true)"
                [[ -z "$pids" ]] && break
                sleep 0.1
            done
            # shellcheck disable=SC2086
            if [[ -n "$pids" ]]; then kill -KILL $pids 2>/dev/null || true; fi
        fi
    done
    for ns in $(our_namespaces); do
        ip link del "$ns" 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    for link in $(our_links); do
        ip link del "$link" 2>/dev/null || true
    done
    local cgroup
    for cgroup in $(our_cgroups); do
        # Whatever is still in a board's cgroup was started for this set (outside its namespace
        # too, like a command that left it); a cgroup with processes cannot be removed.
        for _ in $(seq 50); do
            pids="$(cat "$cgroup/cgroup.procs" 2>/dev/null || true)"
            [[ -z "$pids" ]] && break
            # shellcheck disable=SC2086  # one pid per word
            kill -TERM $pids 2>/dev/null || true
            sleep 0.1
        done
        pids="$(cat "$cgroup/cgroup.procs" 2>/dev/null || true)"
        # shellcheck disable=SC2086
        if [[ -n "$pids" ]]; then kill -KILL $pids 2>/dev/null || true; fi
        for _ in $(seq 50); do
            rmdir "$cgroup" 2>/dev/null && break
            sleep 0.1
        done
    done
    [[ -z "$(our_namespaces)$(our_links)$(our_cgroups)" ]] ||
        die "could not remove everything of '$PREFIX'"
}

cmd_up() {
    local count="$1" k values rates=() cpus=()
    if ! [[ "$count" =~ ^[0-9]+$ ]] || ((count < 1 || count > 200)); then
        die "up needs a board count from 1 to 200, got '$count'"
    fi
    # Check every per-board value before anything is built.
    if [[ -n "$RATE" ]]; then
        values="$(per_board "$RATE" "$count" --rate)"
        mapfile -t rates <<<"$values"
    fi
    if [[ -n "$CPU" ]]; then
        need_cpu_controller
        values="$(per_board "$CPU" "$count" --cpu)"
        mapfile -t cpus <<<"$values"
        for k in "${cpus[@]}"; do quota_of "$k" >/dev/null; done
    fi
    cmd_down
    if [[ -n "$(ip -4 route show "$SUBNET.0/24")" ]]; then
        die "subnet $SUBNET.0/24 is already routed here; pick another with --subnet"
    fi
    BUILT=0
    trap '[[ $BUILT == 1 ]] || cmd_down' EXIT  # a failure half-way leaves nothing behind
    ip link add "$PREFIX-br" type bridge
    disable_ipv6 "$PREFIX-br"
    ip addr add "$SUBNET.1/24" dev "$PREFIX-br"
    ip link set "$PREFIX-br" up
    add_host "$PREFIX-tr" "$SUBNET.2"
    for ((k = 1; k <= count; k++)); do
        add_host "$PREFIX-b$k" "$SUBNET.$((10 + k))"
        if ((${#rates[@]} > 0)) && [[ "${rates[k - 1]}" != none && -n "${rates[k - 1]}" ]]; then
            shape_link "$PREFIX-b$k" "${rates[k - 1]}"
        fi
        if ((${#cpus[@]} > 0)); then set_cpu "$PREFIX-b$k" "${cpus[k - 1]}"; fi
    done
    BUILT=1
    cmd_list
}

cmd_list() {
    local ns address qdisc cpu cgroup
    echo "controller $(ip -4 -o addr show dev "$PREFIX-br" 2>/dev/null | awk '{print $4}')"
    for ns in $(our_namespaces | sort -V); do
        address="$(ip netns exec "$ns" ip -4 -o addr show dev eth0 | awk '{print $4}')"
        qdisc="$(tc qdisc show dev "$ns" root | grep -o 'rate [^ ]*' || echo unshaped)"
        cgroup="$(cgroup_of "$ns")"
        cpu=""
        if [[ -f "$cgroup/cpu.cfs_quota_us" ]]; then
            cpu="$(awk -v q="$(cat "$cgroup/cpu.cfs_quota_us")" \
                -v p="$(cat "$cgroup/cpu.cfs_period_us")" \
                'BEGIN { if (q < 0) print "cpu none"; else printf "cpu %.2f\n", q / p }')"
        fi
        echo "$ns $address $(cat "/sys/class/net/$ns/operstate") $qdisc${cpu:+ $cpu}"
    done
}

need_namespace() {
    ip netns list | awk '{print $1}' | grep -qx "$1" || die "no namespace $1; run 'up' first"
}

main() {
    local command="" positional=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --prefix) PREFIX="$2"; shift 2 ;;
        --subnet) SUBNET="$2"; shift 2 ;;
        --rate) RATE="$2"; shift 2 ;;
        --cpu) CPU="$2"; shift 2 ;;
        --burst) BURST="$2"; shift 2 ;;
        --latency) LATENCY="$2"; shift 2 ;;
        --) shift; positional+=("$@"); break ;;
        *)
            if [[ -z "$command" ]]; then
                command="$1"
            else
                positional+=("$1")
            fi
            shift
            # exec: everything after BOARD is the command to run, options included
            if [[ "$command" == exec && ${#positional[@]} -ge 1 ]]; then
                positional+=("$@")
                break
            fi
            ;;
        esac
    done
    [[ -n "$command" ]] || usage
    check_names
    [[ $EUID -eq 0 ]] || die "run as root: network namespaces need it"
    command -v ip >/dev/null || die "iproute2's 'ip' is missing"
    local ns
    case "$command" in
    up)
        [[ ${#positional[@]} -eq 1 ]] || usage
        command -v tc >/dev/null || [[ -z "$RATE" ]] || die "'tc' is missing: cannot shape"
        cmd_up "${positional[0]}"
        ;;
    down) cmd_down ;;
    list) cmd_list ;;
    shape)
        [[ ${#positional[@]} -eq 2 ]] || usage
        ns="$(namespace_of "${positional[0]}")"
        need_namespace "$ns"
        shape_link "$ns" "${positional[1]}"
        ;;
    unshape)
        [[ ${#positional[@]} -eq 1 ]] || usage
        ns="$(namespace_of "${positional[0]}")"
        need_namespace "$ns"
        unshape_link "$ns"
        ;;
    cpu)
        [[ ${#positional[@]} -eq 2 ]] || usage
        ns="$(namespace_of "${positional[0]}")"
        [[ "$ns" != "$PREFIX-tr" ]] || die "the tracker's namespace has no CPU quota"
        need_namespace "$ns"
        need_cpu_controller
        set_cpu "$ns" "${positional[1]}"
        ;;
    cut | restore)
        [[ ${#positional[@]} -eq 1 ]] || usage
        ns="$(namespace_of "${positional[0]}")"
        need_namespace "$ns"
        local state=down
        [[ "$command" == restore ]] && state=up
        ip link set "$ns" "$state"
        ip netns exec "$ns" ip link set eth0 "$state"
        ;;
    exec)
        [[ ${#positional[@]} -ge 2 ]] || usage
        ns="$(namespace_of "${positional[0]}")"
        need_namespace "$ns"
        # Join the board's cgroup first: exec keeps this pid, so the command starts in it.
        if [[ -d "$(cgroup_of "$ns")" ]]; then echo $$ >"$(cgroup_of "$ns")/cgroup.procs"; fi
        # nsenter, not `ip netns exec`: that mounts a fresh /sys, without /sys/fs/cgroup, and a
        # board's worker reads its own CPU quota there (tvmpipe.probe.memory), as on a real one.
        exec nsenter --net="/run/netns/$ns" -- "${positional[@]:1}"
        ;;
    *) usage ;;
    esac
}

main "$@"
