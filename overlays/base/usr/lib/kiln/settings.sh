# Node settings for the root's boot script (sourced, never run): kiln's
# node config format (hostname, role, server, data_disk, k3s) from
#   - a NoCloud seed: a filesystem labelled CIDATA (cidata) holding user-data
#     (and meta-data, whose local-hostname names the node when user-data
#     does not), as `kiln seed` makes;
#   - kiln.yaml on the boot partition of a disk root (an SD card's FAT boot
#     partition, a disk image's ESP), which `kiln flash` writes;
#   - the EC2-style metadata service's user-data (IMDSv2, then v1), asked
#     only on machines whose firmware (DMI) names a cloud that has one, or
#     with kiln.imds=1.
# Each copies what it found to $1 without carriage returns, readable by root
# alone (it may hold a cluster token), and sets KILN_SETTINGS_FILE to its
# name for messages. A file of comments only is no settings.

# True when $1 holds a setting (a line that is not a comment or blank).
kiln_has_settings() { grep -q '^[^#[:space:]]' "$1" 2>/dev/null; }

# Copies $1 to $2 without carriage returns, mode 0600.
kiln_copy_settings() { (umask 077 && tr -d '\r' <"$1" >"$2"); }

# kiln.yaml from the boot partition (partition 1, FAT) of the disk $1 to $2.
# Fails when there is none.
kiln_read_settings() {
    boot=$(kiln_partition_of "$1" 1) || { log "$1 has no partition 1 (the boot partition): no node settings"; return 1; }
    KILN_SETTINGS_FILE="kiln.yaml on $boot"
    for m in vfat nls_cp437 nls_ascii nls_iso8859_1 nls_utf8; do
        modprobe -q "$m" 2>/dev/null
    done
    mkdir -p /run/kiln/boot-partition
    if ! mount -t vfat -o ro,nosuid,nodev,noexec "$boot" /run/kiln/boot-partition 2>/run/kiln/mount.err; then
        log "mounting the boot partition $boot failed ($(head -n1 /run/kiln/mount.err)); no node settings"
        return 1
    fi
    found=1
    if [ -f /run/kiln/boot-partition/kiln.yaml ]; then
        kiln_copy_settings /run/kiln/boot-partition/kiln.yaml "$2"
        # Only comments and blank lines (the image's template) is no settings.
        kiln_has_settings "$2" || { found=0; log "$KILN_SETTINGS_FILE holds no settings (comments only)"; }
    else
        found=0
        log "the boot partition $boot has no kiln.yaml"
    fi
    umount /run/kiln/boot-partition
    [ $found = 1 ] && log "node settings: $KILN_SETTINGS_FILE"
    [ $found = 1 ]
}

# The user-data of a NoCloud seed to $1. Fails when there is no seed.
kiln_read_seed() {
    dev=$(findfs LABEL=CIDATA 2>/dev/null || findfs LABEL=cidata 2>/dev/null) || return 1
    [ -b "$dev" ] || return 1
    KILN_SETTINGS_FILE="user-data of the NoCloud seed $dev"
    for m in vfat isofs nls_cp437 nls_ascii nls_iso8859_1 nls_utf8; do
        modprobe -q "$m" 2>/dev/null
    done
    mkdir -p /run/kiln/seed
    if ! mount -o ro,nosuid,nodev,noexec "$dev" /run/kiln/seed 2>/run/kiln/mount.err; then
        log "mounting the NoCloud seed $dev failed ($(head -n1 /run/kiln/mount.err)); not using it"
        return 1
    fi
    found=0
    if [ -f /run/kiln/seed/user-data ]; then
        kiln_copy_settings /run/kiln/seed/user-data "$1"
        host=$(tr -d '\r' </run/kiln/seed/meta-data 2>/dev/null | kiln_yaml_scalar local-hostname)
        if [ -n "$host" ] && [ -z "$(kiln_yaml_scalar hostname <"$1")" ]; then
            printf 'hostname: "%s"\n' "$host" >>"$1"
        fi
        kiln_has_settings "$1" && found=1
    fi
    umount /run/kiln/seed
    [ $found = 1 ] || { log "the NoCloud seed $dev has no user-data with settings"; return 1; }
    log "node settings: $KILN_SETTINGS_FILE"
}

# True when the firmware names a cloud with an EC2-style metadata service
# at 169.254.169.254, or kiln.imds=1 asks for it.
kiln_imds_expected() {
    [ "$KILN_IMDS" = 1 ] && return 0
    [ "$KILN_IMDS" = 0 ] && return 1
    dmi=$(cat /sys/class/dmi/id/sys_vendor /sys/class/dmi/id/product_name /sys/class/dmi/id/bios_vendor 2>/dev/null)
    case "$dmi" in
        *Amazon*|*OpenStack*|*Alibaba*|*"Oracle Cloud"*|*Exoscale*) return 0 ;;
    esac
    return 1
}

# The EC2-style metadata service's user-data to $1: an IMDSv2 session token
# first (a PUT, spoken over nc as busybox wget has no PUT), then the GET
# with it (or without, IMDSv1). 404 (no user data) or no service: fails.
kiln_read_imds() {
    kiln_imds_expected || return 1
    KILN_SETTINGS_FILE="user-data of the metadata service 169.254.169.254"
    token=$(printf 'PUT /latest/api/token HTTP/1.0\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 300\r\n\r\n' \
        | timeout 10 nc -w 5 169.254.169.254 80 2>/dev/null \
        | awk 'body { printf "%s", $0; next } /^\r?$/ { body = 1 }' | tr -d '\r')
    case "$token" in *[!A-Za-z0-9_=+/-]*) token="" ;; esac
    i=0
    while [ $i -lt 3 ]; do
        if wget -q -T 5 ${token:+--header "X-aws-ec2-metadata-token: $token"} \
            -O /run/kiln/imds.user-data http://169.254.169.254/latest/user-data 2>/run/kiln/imds.err; then
            kiln_copy_settings /run/kiln/imds.user-data "$1"
            rm -f /run/kiln/imds.user-data
            if kiln_has_settings "$1"; then
                log "node settings: $KILN_SETTINGS_FILE"
                return 0
            fi
            log "the metadata service's user-data holds no settings"
            return 1
        fi
        grep -q "404" /run/kiln/imds.err && { log "the metadata service has no user-data"; return 1; }
        i=$((i + 1))
        sleep $i
    done
    log "no answer from the metadata service 169.254.169.254 ($(head -n1 /run/kiln/imds.err))"
    return 1
}
