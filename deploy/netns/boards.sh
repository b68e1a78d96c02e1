#!/usr/bin/env bash
# boards.sh: simulated edge boards in Linux network namespaces, for trying tvmpipe on one machine.
#
# Usage (as root; needs iproute2's `ip` and `tc`):
#   boards.sh up N [--rate R] [--burst B] [--latency L]   create N boards (recreates the set)
#   boards.sh down                                          remove everything of the set (idempotent)
#   boards.sh shape BOARD RATE [--burst B] [--latency L]    limit a board's link, both directions
#   boards.sh unshape BOARD                                 remove that limit
#   boards.sh cut BOARD | restore BOARD                     take a board's link down / up again
#   boards.sh list                                          namespaces, addresses, shaping
#   boards.sh exec BOARD CMD [ARG...]                       run a command inside a board
# Every command also takes --prefix P (default $TVMPIPE_NETNS_PREFIX or "tvpnet"; 1-10 of
# [a-z0-9]) and `up` takes --subnet A.B.C (default $TVMPIPE_NETNS_SUBNET or 10.77.0), so that
# several sets can live side by side. BOARD is b1..bN (or just its number), or "tr".
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
# Example session (or all in one: deploy/netns/boards.py, which also starts the processes):
#   sudo deploy/netns/boards.sh up 3 --rate 20mbit
#   sudo ip netns exec tvpnet-tr python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190 &
#   sudo ip netns exec tvpnet-b1 tvmpipe-worker --host 10.77.0.11 --port 9090 \
#        --tracker 10.77.0.2:9190 --key big --custom-addr 10.77.0.11 &
#   ...  PipelineModule(lib, tracker=("10.77.0.2", 9190), client_host="10.77.0.1")
#   sudo deploy/netns/boards.sh down      # also ends every process left in the namespaces
set -euo pipefail

PREFIX="${TVMPIPE_NETNS_PREFIX:-tvpnet}"
SUBNET="${TVMPIPE_NETNS_SUBNET:-10.77.0}"
BURST="32kb"
LATENCY="50ms"
RATE=""

die() {
    echo "boards.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
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
    [[ -z "$(our_namespaces)$(our_links)" ]] || die "could not remove everything of '$PREFIX'"
}

cmd_up() {
    local count="$1" k
    if ! [[ "$count" =~ ^[0-9]+$ ]] || ((count < 1 || count > 200)); then
        die "up needs a board count from 1 to 200, got '$count'"
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
        if [[ -n "$RATE" ]]; then shape_link "$PREFIX-b$k" "$RATE"; fi
    done
    BUILT=1
    cmd_list
}

cmd_list() {
    local ns address qdisc
    echo "controller $(ip -4 -o addr show dev "$PREFIX-br" 2>/dev/null | awk '{print $4}')"
    for ns in $(our_namespaces | sort -V); do
        address="$(ip netns exec "$ns" ip -4 -o addr show dev eth0 | awk '{print $4}')"
        qdisc="$(tc qdisc show dev "$ns" root | grep -o 'rate [^ ]*' || echo unshaped)"
        echo "$ns $address $(cat "/sys/class/net/$ns/operstate") $qdisc"
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
        exec ip netns exec "$ns" "${positional[@]:1}"
        ;;
    *) usage ;;
    esac
}

main "$@"
