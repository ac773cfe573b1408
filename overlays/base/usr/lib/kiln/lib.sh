# Shared shell functions of kiln's boot scripts (initramfs and root).
# Sourced, never run. Everything it learns is kept in /run/kiln so that the
# root's scripts see what the initramfs found.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/run/kiln/bin

# True when something is mounted at $1.
is_mounted() { grep -q "^[^ ]* $1 " /proc/mounts; }

log() { echo "kiln: $*" >/dev/console; }

fail() {
    log "error: $*"
    stage failed
    # kiln.onfail=reboot (a disk image's A/B slots): restart, so that the
    # boot loader counts this slot's failed try and falls back to the other.
    if [ "$KILN_ONFAIL" = reboot ]; then
        log "restarting in 10 s (kiln.onfail=reboot)"
        sleep 10
        sync
        reboot -f
    fi
    # Leave the console readable and keep PID 1 alive: nothing boots past this.
    while :; do sleep 3600; done
}

# The boot scripts' back-off: sleeps $delay seconds, then doubles $delay,
# capped at 60.
kiln_backoff() {
    sleep "$delay"
    delay=$((delay * 2))
    [ "$delay" -le 60 ] || delay=60
}

# Loads kernel modules (already loaded or built in counts); logs each that
# did not load and leaves the ones that did in $loaded.
kiln_modprobe() {
    loaded=""
    for m in "$@"; do
        if modprobe "$m" 2>/run/kiln/modprobe.err || [ -d "/sys/module/$m" ]; then
            loaded="$loaded $m"
        else
            log "module $m did not load: $(head -n1 /run/kiln/modprobe.err)"
        fi
    done
}

# Parses kiln.* parameters of /proc/cmdline into /run/kiln/cmdline.env.
kiln_read_cmdline() {
    : >/run/kiln/cmdline.env
    for word in $(cat /proc/cmdline); do
        case "$word" in
            kiln.root=*) echo "KILN_ROOT='${word#kiln.root=}'" ;;
            kiln.root_sha256=*) echo "KILN_ROOT_SHA256='${word#kiln.root_sha256=}'" ;;
            kiln.config=*) echo "KILN_CONFIG='${word#kiln.config=}'" ;;
            kiln.server=*) echo "KILN_SERVER='${word#kiln.server=}'" ;;
            kiln.imds=*) echo "KILN_IMDS='${word#kiln.imds=}'" ;;
            kiln.onfail=*) echo "KILN_ONFAIL='${word#kiln.onfail=}'" ;;
        esac
    done >/run/kiln/cmdline.env
    . /run/kiln/cmdline.env
}

# Prints a boot stage on the console and reports it to kiln.server (when
# given and the network is up). Stages met before the network are queued.
stage() {
    echo "kiln: stage=$1" >/dev/console
    echo "$1" >>/run/kiln/stages
    [ -n "$KILN_SERVER" ] || return 0
    if [ -s /run/kiln/net.env ]; then
        . /run/kiln/net.env
        while read -r s; do
            wget -q -T 5 -O /dev/null --post-data "mac=$KILN_MAC&stage=$s" "$KILN_SERVER/api/v1/stages" 2>/dev/null \
                || log "could not report stage $s to $KILN_SERVER"
        done <<STAGES
$(cat /run/kiln/stages.pending 2>/dev/null; echo "$1")
STAGES
        rm -f /run/kiln/stages.pending
    else
        echo "$1" >>/run/kiln/stages.pending
    fi
}

# Brings up the first interface that gets a DHCP lease; records it in
# /run/kiln/net.env (KILN_IFACE, KILN_MAC, KILN_IP).
kiln_network_up() {
    ip link set lo up
    tries=0
    while [ $tries -lt 5 ]; do
        for dev in /sys/class/net/*; do
            iface=${dev##*/}
            [ "$iface" = lo ] && continue
            [ -e "$dev/device" ] || continue
            ip link set "$iface" up
            if udhcpc -i "$iface" -n -q -t 4 -T 2 -s /lib/kiln/udhcpc.script >/dev/null 2>&1; then
                mac=$(cat "$dev/address")
                ip=$(ip -4 -o addr show dev "$iface" | awk '{print $4}' | head -n1)
                printf "KILN_IFACE='%s'\nKILN_MAC='%s'\nKILN_IP='%s'\n" "$iface" "$mac" "${ip%/*}" >/run/kiln/net.env
                log "network: $iface ($mac) has ${ip}"
                return 0
            fi
        done
        tries=$((tries + 1))
        sleep $tries
    done
    return 1
}

# Prints one line per byte of the $3 512-byte sectors at sector $2 of $1, as
# two hex digits.
kiln_sectors_hex() {
    dd if="$1" bs=512 skip="$2" count="$3" 2>/dev/null | od -An -tx1 -v | tr -s ' \n' '\n\n' | grep .
}

# Prints the PARTUUID of partition $2 of the disk (or disk image) $1 as
# Linux names it: MBR "<disk id>-<nn>" (8 and 2 hex digits), GPT the
# partition's unique GUID; lower case. Fails when $1 has neither table.
kiln_partuuid() {
    r=$(kiln_sectors_hex "$1" 0 1 | awk -v n="$2" '
        { b[NR - 1] = $1 }
        END {
            if (NR != 512 || b[510] != "55" || b[511] != "aa") exit 1
            if (b[450] == "ee") { print "gpt"; exit 0 }
            if (n < 1 || n > 4) exit 1
            e = 446 + (n - 1) * 16
            if (b[e + 4] == "00") exit 1
            printf "%s%s%s%s-%02x\n", b[443], b[442], b[441], b[440], n
        }') || return 1
    [ "$r" = gpt ] || { echo "$r"; return 0; }
    # GPT: the header at LBA 1 names the entries' LBA (8 bytes at 72) and
    # their size (4 bytes at 84); an entry's unique GUID is at its byte 16.
    lbs=$(cat "/sys/class/block/${1##*/}/queue/logical_block_size" 2>/dev/null || echo 512)
    hdr=$(kiln_sectors_hex "$1" $((lbs / 512)) 1 | awk '
        function h(x) { return (index("0123456789abcdef", substr(x, 1, 1)) - 1) * 16 + index("0123456789abcdef", substr(x, 2, 1)) - 1 }
        { b[NR - 1] = $1 }
        END {
            if (b[0] b[1] b[2] b[3] b[4] b[5] b[6] b[7] != "4546492050415254") exit 1
            lba = 0; for (i = 79; i >= 72; i--) lba = lba * 256 + h(b[i])
            sz = 0; for (i = 87; i >= 84; i--) sz = sz * 256 + h(b[i])
            print lba, sz
        }') || return 1
    [ -n "$hdr" ] || return 1
    set -- "$1" "$2" $hdr
    off=$(($3 * lbs + ($2 - 1) * $4))
    kiln_sectors_hex "$1" $((off / 512)) 1 | awk -v o=$((off % 512)) '
        { b[NR - 1] = $1 }
        END {
            g = o + 16; z = 1
            for (i = 0; i < 16; i++) if (b[g + i] != "00") z = 0
            if (z) exit 1
            printf "%s%s%s%s-%s%s-%s%s-%s%s-%s%s%s%s%s%s\n", \
                b[g+3], b[g+2], b[g+1], b[g], b[g+5], b[g+4], b[g+7], b[g+6], \
                b[g+8], b[g+9], b[g+10], b[g+11], b[g+12], b[g+13], b[g+14], b[g+15]
        }'
}

# The whole disk a partition (/dev/NAME) is on, as /dev/DISK.
kiln_disk_of() {
    d=$(readlink -f "/sys/class/block/${1##*/}") || return 1
    d=${d%/*}
    echo "/dev/${d##*/}"
}

# Prints the block device a root spec names: PARTUUID=, PARTLABEL= (GPT
# partition name), LABEL= (filesystem label) or a /dev/ path. Fails when no
# device (yet) matches.
kiln_find_partition() {
    case "$1" in
        /dev/*) [ -b "$1" ] && echo "$1" ;;
        LABEL=*) dev=$(findfs "$1" 2>/dev/null) && [ -b "$dev" ] && echo "$dev" ;;
        PARTUUID=*)
            want=$(echo "${1#PARTUUID=}" | tr 'A-F' 'a-f')
            for p in /sys/class/block/*; do
                [ -e "$p/partition" ] || continue
                disk=$(kiln_disk_of "$p") || continue
                got=$(kiln_partuuid "$disk" "$(cat "$p/partition")") || continue
                [ "$got" = "$want" ] && [ -b "/dev/${p##*/}" ] && { echo "/dev/${p##*/}"; return 0; }
            done
            return 1
            ;;
        PARTLABEL=*)
            for u in /sys/class/block/*/uevent; do
                if grep -qx "PARTNAME=${1#PARTLABEL=}" "$u" 2>/dev/null; then
                    dev=/dev/$(sed -n 's/^DEVNAME=//p' "$u")
                    [ -b "$dev" ] && { echo "$dev"; return 0; }
                fi
            done
            return 1
            ;;
        *) return 1 ;;
    esac
}

# POSTs a form ($2, already url-encoded) to the URL $1; the response body goes
# to the file $3 and its HTTP status to $http_status (000 when there was no
# answer, with the reason in $http_error). http:// is spoken over busybox nc
# so that a refusal's body (why) can be read; https:// goes through wget,
# which gives only the status line of a refusal.
kiln_http_post() {
    http_status=000
    http_error=""
    case "$1" in
        http://*)
            rest=${1#http://}
            hostport=${rest%%/*}
            path=${rest#"$hostport"}
            [ -n "$path" ] || path=/
            host=${hostport%:*}
            port=${hostport##*:}
            [ "$port" != "$hostport" ] || port=80
            printf 'POST %s HTTP/1.0\r\nHost: %s\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
                "$path" "$hostport" "${#2}" "$2" \
                | timeout 30 nc -w 10 "$host" "$port" >"$3.raw" 2>/run/kiln/http.err
            if [ ! -s "$3.raw" ]; then
                http_error="no answer from $hostport$(sed -n '1s/^/: /p' /run/kiln/http.err)"
                rm -f "$3.raw"
                return 1
            fi
            http_status=$(head -n1 "$3.raw" | awk '/^HTTP\/1\.[01] [0-9][0-9][0-9]/ { print $2 }')
            # The body: everything after the first empty line.
            awk 'body { print; next } /^\r?$/ { body = 1 }' "$3.raw" >"$3"
            rm -f "$3.raw"
            if [ -z "$http_status" ]; then
                http_status=000
                http_error="$hostport did not answer HTTP"
                return 1
            fi
            ;;
        *)
            if wget -q -T 10 -O "$3" --header "Content-Type: application/x-www-form-urlencoded" \
                --post-data "$2" "$1" 2>/run/kiln/http.err; then
                http_status=200
            else
                http_status=$(sed -n 's/.*server returned error: HTTP\/1\.[01] \([0-9][0-9][0-9]\).*/\1/p' /run/kiln/http.err | head -n1)
                http_status=${http_status:-000}
                http_error=$(head -n1 /run/kiln/http.err)
                : >"$3"
            fi
            ;;
    esac
    [ "$http_status" = 200 ]
}

# Node config (YAML, as kiln serves it): reads a top-level scalar.
kiln_yaml_scalar() {
    awk -v key="$1" '
        $0 ~ "^" key ":" {
            v = substr($0, length(key) + 2)
            sub(/^[ \t]+/, "", v); sub(/[ \t]+#.*$/, "", v); sub(/[ \t]+$/, "", v)
            if (v ~ /^".*"$/ || v ~ /^\047.*\047$/) v = substr(v, 2, length(v) - 2)
            print v; exit
        }'
}

# Node config: prints the block under a top-level key with its common
# indentation removed, verbatim otherwise (the k3s: map becomes config.yaml).
kiln_yaml_block() {
    awk -v key="$1" '
        inblock && /^[^ \t#]/ { exit }
        inblock {
            lines[n++] = $0
            if ($0 ~ /[^ \t]/ && indent == "") { match($0, /^[ \t]*/); indent = RLENGTH }
            next
        }
        $0 ~ "^" key ":[ \t]*$" { inblock = 1 }
        END {
            while (n > 0 && lines[n - 1] !~ /[^ \t]/) n--
            for (i = 0; i < n; i++) print substr(lines[i], indent + 1)
        }'
}
