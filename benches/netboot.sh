#!/usr/bin/env bash
# Netboot benchmark (`just bench-netboot`), as root. Three parts, each against
# a reference server on the same machine in the same run:
#   tftp  64 MiB to atftp at blksize 1468 over loopback, windowsize 16 and
#         lock-step, against dnsmasq's TFTP (the ignored test `bench` in
#         netboot-server/tests/tftp_interop.rs).
#   http  64 parallel downloads (wrk, 64 connections, 10 s) of a 100 MB
#         artifact, against nginx (sendfile on) serving the same file.
#   dhcp  full mode under perfdhcp at 1000 DORA exchanges/s for 10 s with
#         10000 clients, between two network namespaces; drops, and p50/p99
#         latency of DISCOVER-OFFER and REQUEST-ACK, against dnsmasq.
# `benches/netboot.sh http dhcp` runs only the parts named.
# Needs: atftp, dnsmasq, nginx, wrk, perfdhcp (kea-admin), iproute2, python3, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
parts=${*:-tftp http dhcp}
[ "$(id -u)" = 0 ] || { echo "bench-netboot needs root (namespaces, port 67/69)"; exit 1; }
for tool in atftp dnsmasq nginx wrk perfdhcp python3 ip curl; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install atftp dnsmasq nginx-light wrk kea-admin python3 iproute2 curl)"; exit 1; }
done
cargo build --release --quiet
kiln=$PWD/target/release/kiln
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns del kbench-s 2>/dev/null || true
    ip netns del kbench-c 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
echo "== netboot benchmark: $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"

# An image directory whose one artifact is 100 MB of random bytes.
mkdir -p "$work/images/bench"
head -c 100000000 /dev/urandom >"$work/images/bench/rootfs.squashfs"
# nginx's workers run as www-data.
chmod 755 "$work" "$work/images" "$work/images/bench"
chmod 644 "$work/images/bench/rootfs.squashfs"
sha=$(sha256sum "$work/images/bench/rootfs.squashfs" | cut -d' ' -f1)
cat >"$work/images/bench/manifest.json" <<EOF
{"name":"bench","arch":"x86_64","kiln_version":"bench","spec_sha256":"","source_date_epoch":0,
 "kernel":{"package":"none","version":"none"},"k3s":null,"packages":[],
 "artifacts":[{"name":"rootfs.squashfs","sha256":"$sha","size":100000000}]}
EOF
# kiln serve needs the iPXE binaries: fetch them once (mirror or warm cache),
# then every start below is offline.
wait_up() { # log file, then tries of 0.1 s
    for _ in $(seq "${2:-100}"); do grep -q "kiln serve is up" "$1" && return; sleep 0.1; done
    cat "$1"; exit 1
}
"$kiln" serve --dhcp off --http 127.0.0.1:18480 --images "$work/images" --default-image bench \
    --state "$work/warm.db" >"$work/warm.log" 2>&1 &
warm=$!
wait_up "$work/warm.log" 600
kill "$warm"; wait "$warm" 2>/dev/null || true

if [[ $parts == *tftp* ]]; then
    echo "== TFTP: 64 MiB to atftp, blksize 1468, loopback"
    cargo test --release -q -p kiln-netboot-server --test tftp_interop -- --ignored --nocapture bench \
        >"$work/tftp.out" 2>&1 || { cat "$work/tftp.out"; exit 1; }
    grep -E "^(BENCH|SKIP)" "$work/tftp.out" | sed "s/^/  /"
fi

if [[ $parts == *http* ]]; then
    echo "== HTTP: 64 parallel downloads of a 100 MB file (wrk -c64 -t2 -d10s), loopback"
    cat >"$work/nginx.conf" <<EOF
worker_processes auto;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  server { listen 127.0.0.1:18482; root $work/images; }
}
EOF
    nginx -c "$work/nginx.conf" &
    pids+=($!)
    "$kiln" serve --offline --dhcp off --http 127.0.0.1:18481 --images "$work/images" \
        --default-image bench --state "$work/http.db" >"$work/http.log" 2>&1 &
    pids+=($!)
    wait_up "$work/http.log"
    gbps() { # url -> GB/s
        wrk -t2 -c64 -d10s --timeout 60s "$1" | awk '/Transfer\/sec/ {
            v = $2; u = substr(v, length(v) - 1); v += 0
            if (u == "MB") v /= 1024; if (u == "KB") v /= 1048576; printf "%.2f", v }'
    }
    # Warm both (page cache, the first request maps and checks the artifact).
    curl -sf -o /dev/null http://127.0.0.1:18481/images/bench/rootfs.squashfs
    curl -sf -o /dev/null http://127.0.0.1:18482/bench/rootfs.squashfs \
        || { echo "nginx does not serve the file:"; cat "$work/nginx.err"; exit 1; }
    for round in 1 2 3; do
        k=$(gbps http://127.0.0.1:18481/images/bench/rootfs.squashfs)
        n=$(gbps http://127.0.0.1:18482/bench/rootfs.squashfs)
        awk -v r="$round" -v k="$k" -v n="$n" \
            'BEGIN { printf "  round %d: kiln %s GiB/s, nginx %s GiB/s, ratio %.2f\n", r, k, n, k / n }'
    done
fi

if [[ $parts == *dhcp* ]]; then
    echo "== DHCP full mode: perfdhcp -r 1000 -p 10 -R 10000 (DORA), two namespaces"
    netns() {
        ip netns del kbench-s 2>/dev/null || true
        ip netns del kbench-c 2>/dev/null || true
        ip netns add kbench-s
        ip netns add kbench-c
        ip link add kbench0 type veth peer name kbench1
        ip link set kbench0 netns kbench-s
        ip link set kbench1 netns kbench-c
        ip -n kbench-s addr add 10.88.0.1/16 dev kbench0
        ip -n kbench-c addr add 10.88.0.2/16 dev kbench1
        for ns in kbench-s kbench-c; do ip -n $ns link set lo up; done
        ip -n kbench-s link set kbench0 up
        ip -n kbench-c link set kbench1 up
    }
    report() { # label, perfdhcp output
        python3 - "$1" "$2" <<'EOF'
import re, sys
label, path = sys.argv[1], sys.argv[2]
text = open(path).read()
def stat(section, key):
    m = re.search(r"Statistics for: " + section + r"\*\*\*.*?" + key + r": ([^\n]+)", text, re.S)
    return m.group(1).strip() if m else "?"
rate = re.search(r"Rate: ([\d.]+)", text)
parts = []
for section in ("DISCOVER-OFFER", "REQUEST-ACK"):
    m = re.search(r"Timestamps for packets: " + section + r"\*\*\*\n(.*?)(\*\*\*|\Z)", text, re.S)
    delays = sorted(float(b) - float(a) for a, b in
                    re.findall(r"sent / received: ([\d.]+) / ([\d.]+)", m.group(1) if m else ""))
    q = lambda p: delays[min(len(delays) - 1, int(p * len(delays)))] * 1000 if delays else float("nan")
    parts.append(f"{section} sent {stat(section, 'sent packets')} drops {stat(section, 'drops')} "
                 f"p50 {q(0.50):.2f} ms p99 {q(0.99):.2f} ms max {q(1.0):.2f} ms")
print(f"  {label}: {rate.group(1) if rate else '?'} exchanges/s")
for p in parts:
    print(f"    {p}")
EOF
    }
    netns
    ip netns exec kbench-s "$kiln" serve --offline --interface kbench0 --dhcp full \
        --range 10.88.1.0-10.88.255.254 --http 10.88.0.1:18483 --images "$work/images" \
        --default-image bench --state "$work/dhcp.db" >"$work/dhcp.log" 2>&1 &
    pids+=($!)
    wait_up "$work/dhcp.log"
    ip netns exec kbench-c perfdhcp -4 -l kbench1 -r 1000 -p 10 -R 10000 -x t 10.88.0.1 \
        >"$work/perf-kiln.out" 2>&1 || true
    report "kiln serve" "$work/perf-kiln.out"
    kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

    netns
    ip netns exec kbench-s dnsmasq -k --port=0 --interface=kbench0 --bind-interfaces \
        --dhcp-range=10.88.1.0,10.88.255.254,255.255.0.0,1h --dhcp-leasefile="$work/dnsmasq.leases" \
        --no-ping --dhcp-authoritative --dhcp-lease-max=70000 --log-facility="$work/dnsmasq.log" &
    pids+=($!)
    sleep 1
    ip netns exec kbench-c perfdhcp -4 -l kbench1 -r 1000 -p 10 -R 10000 -x t 10.88.0.1 \
        >"$work/perf-dnsmasq.out" 2>&1 || true
    report "dnsmasq" "$work/perf-dnsmasq.out"
fi
