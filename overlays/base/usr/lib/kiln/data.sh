# The node's persistent data, for the root's boot script (sourced, never run).
#
# A partition holding an ext4 filesystem labelled kiln-data (or a GPT
# partition named kiln-data) is mounted at /run/kiln/data; its directories
# rancher/ and kiln/ are bound onto /var/lib/rancher and /var/lib/kiln, so
# k3s (etcd, containerd) and kiln's own state (the node secret, the last good
# node config) outlive a reboot. Without it both stay on the root's tmpfs.
#
# A disk named by the node config's data_disk is partitioned and formatted
# only when it is blank: no partitions, not in use, and its first and last
# MiBs all zero. A disk holding anything is never written.

data=/run/kiln/data

# Loads what block devices and ext4 need: the common disk drivers by name,
# then whatever matches the devices present (by modalias). Quiet: most of
# these are absent on any one machine.
kiln_data_modules() {
    for m in virtio_blk virtio_scsi sd_mod ahci nvme mmc_block ext4; do
        modprobe -q "$m" 2>/dev/null
    done
    for a in /sys/bus/*/devices/*/modalias; do
        [ -r "$a" ] && modprobe -q "$(cat "$a")" 2>/dev/null
    done
    # Disks found by the drivers just loaded appear in /dev within moments.
    sleep 1
}

# Prints the device of the kiln-data partition, if there is one.
kiln_data_find() {
    dev=$(findfs LABEL=kiln-data 2>/dev/null) && [ -b "$dev" ] && { echo "$dev"; return 0; }
    for u in /sys/class/block/*/uevent; do
        if grep -qx 'PARTNAME=kiln-data' "$u" 2>/dev/null; then
            dev=/dev/$(sed -n 's/^DEVNAME=//p' "$u")
            [ -b "$dev" ] && { echo "$dev"; return 0; }
        fi
    done
    return 1
}

# Copies the image's baked k3s files (platform manifests, air-gap image
# tarballs) from under $1 (/var/lib/rancher) to the same places under $2 (the
# data partition's rancher/) before that is bound over them: same-named files
# are replaced, others (k3s' own) are kept.
kiln_data_bake() {
    for d in k3s/server/manifests k3s/agent/images; do
        [ -d "$1/$d" ] || continue
        (cd "$1/$d" && find . -type f) | while read -r f; do
            f=${f#./}
            to="$2/$d/$f"
            cmp -s "$1/$d/$f" "$to" && continue
            mkdir -p "${to%/*}"
            cp -p "$1/$d/$f" "$to.kiln-new" && mv "$to.kiln-new" "$to" \
                || log "could not copy the image's $1/$d/$f onto the data partition"
        done
    done
}

# Mounts the kiln-data partition $1 and binds its directories. What is in
# /var/lib/kiln so far (the secret, a config) is kept when the partition has
# none of its own (the first boot after formatting).
kiln_data_use() {
    mkdir -p "$data"
    # Repair what an unclean shutdown left, as fsck does at boot.
    e2fsck -p "$1" >/dev/null 2>&1
    [ $? -lt 4 ] || log "e2fsck found errors on $1 it could not repair; mounting it anyway"
    if ! mount -t ext4 -o noatime "$1" "$data"; then
        log "mounting the data partition $1 failed; /var/lib/rancher and /var/lib/kiln stay in RAM"
        return 1
    fi
    mkdir -p "$data/rancher" "$data/kiln"
    chmod 0700 "$data/kiln"
    for f in /var/lib/kiln/*; do
        [ -e "$f" ] && [ ! -e "$data/kiln/${f##*/}" ] && cp -p "$f" "$data/kiln/"
    done
    kiln_data_bake /var/lib/rancher "$data/rancher"
    mount --bind "$data/rancher" /var/lib/rancher && mount --bind "$data/kiln" /var/lib/kiln || {
        log "binding the data partition's directories failed"
        return 1
    }
    sync
    echo "$1" >/run/kiln/data-device
    log "data partition $1 holds /var/lib/rancher and /var/lib/kiln"
}

# True when the data partition is in use.
kiln_data_mounted() { [ -s /run/kiln/data-device ]; }

# True when the whole disk $1 is blank. Says why not in $why. Any doubt
# counts as not blank.
kiln_disk_blank() {
    name=${1##*/}
    sys=/sys/class/block/$name
    why=""
    [ -d "$sys" ] || { why="the kernel knows no disk $name"; return 1; }
    [ -e "$sys/partition" ] && { why="it is a partition, not a whole disk"; return 1; }
    [ "$(cat "$sys/ro" 2>/dev/null)" = 0 ] || { why="it is read-only"; return 1; }
    for p in "$sys"/"$name"*; do
        [ -e "$p/partition" ] && { why="it has partitions (${p##*/})"; return 1; }
    done
    for h in "$sys"/holders/*; do
        [ -e "$h" ] && { why="it is in use by ${h##*/}"; return 1; }
    done
    grep -q "^$1[^ ]* " /proc/mounts && { why="it is mounted"; return 1; }
    sectors=$(cat "$sys/size" 2>/dev/null)
    [ "${sectors:-0}" -ge 65536 ] || { why="it is smaller than 32 MiB"; return 1; }
    # A partition table, a filesystem or a RAID/LVM signature lives in the
    # first MiBs or the last MiB (backup GPT, old md superblocks): all zero?
    n=$(dd if="$1" bs=1048576 count=4 2>/dev/null | wc -c)
    z=$(dd if="$1" bs=1048576 count=4 2>/dev/null | tr -d '\000' | wc -c)
    [ "$n" = 4194304 ] && [ "$z" = 0 ] || { why="its first 4 MiB are not all zero (or could not be read)"; return 1; }
    n=$(dd if="$1" bs=512 skip=$((sectors - 2048)) count=2048 2>/dev/null | wc -c)
    z=$(dd if="$1" bs=512 skip=$((sectors - 2048)) count=2048 2>/dev/null | tr -d '\000' | wc -c)
    [ "$n" = 1048576 ] && [ "$z" = 0 ] || { why="its last MiB is not all zero (or could not be read)"; return 1; }
    return 0
}

# The node config names a data disk $1 and no kiln-data partition is in use:
# a blank disk becomes one GPT partition named kiln-data with ext4 labelled
# kiln-data; a disk holding anything is left alone.
kiln_data_prepare() {
    disk=$(readlink -f "$1" 2>/dev/null || echo "$1")
    i=0
    while [ ! -b "$disk" ] && [ $i -lt 10 ]; do sleep 1; i=$((i + 1)); done
    if [ ! -b "$disk" ]; then
        log "data_disk $1: no such block device; /var/lib/rancher and /var/lib/kiln stay in RAM"
        return 1
    fi
    if ! kiln_disk_blank "$disk"; then
        log "data_disk $disk is not blank ($why): it is left alone, nothing written; /var/lib/rancher and /var/lib/kiln stay in RAM"
        return 1
    fi
    log "data_disk $disk is blank: making a GPT partition kiln-data with ext4 on it"
    printf 'label: gpt\ntype=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="kiln-data"\n' \
        | sfdisk --quiet "$disk" >/run/kiln/sfdisk.log 2>&1 \
        || { log "partitioning $disk failed: $(tail -n1 /run/kiln/sfdisk.log)"; return 1; }
    part=$(kiln_partition_of "$disk" 1) || { log "the new partition on $disk did not appear"; return 1; }
    mkfs.ext4 -q -F -L kiln-data "$part" >/run/kiln/mkfs.log 2>&1 \
        || { log "mkfs.ext4 on $part failed: $(tail -n1 /run/kiln/mkfs.log)"; return 1; }
    kiln_data_use "$part"
}

# Prints the device of partition $2 of the disk $1, once it exists (10 s).
kiln_partition_of() {
    name=${1##*/}
    i=0
    while [ $i -lt 50 ]; do
        for p in /sys/class/block/"$name"/"$name"*; do
            if [ "$(cat "$p/partition" 2>/dev/null)" = "$2" ] && [ -b "/dev/${p##*/}" ]; then
                echo "/dev/${p##*/}"
                return 0
            fi
        done
        sleep 0.2
        i=$((i + 1))
    done
    return 1
}

# Prints the partition table type of the disk $1 (dos or gpt) and the last
# sector partitions may use by its table (GPT; 0 for dos), then
# "start size type" of its partitions 1-4 (512-byte sectors, one line each,
# "0 0 0" for an empty slot; GPT types as upper-case GUIDs), from sfdisk's
# dump. Fails when $1 has neither table.
kiln_disk_table() {
    sfdisk --dump "$1" 2>/dev/null | awk '
        /^label:/ { label = $2 }
        /^last-lba:/ { lastlba = $2 }
        / : start=/ {
            n = $1; sub(/^.*[^0-9]/, "", n)
            s = $0; sub(/.*start= */, "", s); sub(/[, ].*/, "", s)
            z = $0; sub(/.*size= */, "", z); sub(/[, ].*/, "", z)
            t = $0; sub(/.*type= */, "", t); sub(/[, ].*/, "", t)
            p[n] = s " " z " " toupper(t)
        }
        END {
            if (label != "dos" && label != "gpt") exit 1
            print label " " (label == "gpt" ? lastlba + 0 : 0)
            for (i = 1; i <= 4; i++) print (i in p) ? p[i] : "0 0 0"
        }'
}

# The data partition of a kiln disk: the root came from partition 2 or 3
# (root A or B) of the disk $1, whose partition 1 is FAT: the boot partition
# of an SD card (MBR) or the EFI system partition of a cloud or server disk
# (GPT). Partition 4 is the data partition (ext4 labelled kiln-data; on GPT
# also named kiln-data): made in the free space after root B at first boot,
# grown to the end of the disk when the disk is larger than it (the
# filesystem follows once mounted: kiln_data_grow_fs). Leaves its device in
# $part; fails, saying why in $why, when the disk is not such a disk or has
# no room.
kiln_data_card() {
    disk=$1
    name=${disk##*/}
    why=""
    table=$(kiln_disk_table "$disk") || { why="$disk has no MBR or GPT partition table"; return 1; }
    set -- $table
    label=$1
    table_last=$2
    shift 2
    # $1-$3: partition 1, $4-$6: 2, $7-$9: 3, ${10}-${12}: 4.
    case "$label:$3" in
        dos:B|dos:C|dos:E) ;;
        gpt:C12A7328-F81F-11D2-BA4B-00A0C93EC93B) ;;
        *) why="partition 1 of $disk ($label) is not a FAT boot or EFI system partition (type $3)"; return 1 ;;
    esac
    [ "$5" != 0 ] && [ "$8" != 0 ] || { why="$disk has no root partitions 2 and 3"; return 1; }
    sectors=$(cat "/sys/class/block/$name/size")
    # The last sector a partition may use: a GPT keeps its backup in the
    # last 33 sectors.
    last=$sectors
    new="type=83"
    if [ "$label" = gpt ]; then
        last=$((sectors - 33))
        new="type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=kiln-data"
        # A disk larger than its image (a cloud disk resized) has its backup
        # GPT in the middle: move it to the end first (only then: the table
        # is not rewritten at every boot).
        if [ "$table_last" -lt $((sectors - 34)) ]; then
            sfdisk --quiet --no-reread --no-tell-kernel --relocate gpt-bak-std "$disk" >/run/kiln/sfdisk.log 2>&1 \
                || log "moving the backup GPT of $disk to its end failed: $(tail -n1 /run/kiln/sfdisk.log)"
        fi
    fi
    end3=$(($7 + $8))
    if [ "${11}" = 0 ]; then
        start=$(( (end3 + 2047) / 2048 * 2048 ))
        if [ $((last - start)) -lt 131072 ]; then
            why="$disk has $(( (last - start) / 2048 )) MiB after root B; the data partition needs 64"
            return 1
        fi
        log "making the data partition: $disk partition 4, $(( (last - start) / 2048 )) MiB from sector $start"
        # The disk is in use (the root is on it), so the kernel cannot
        # re-read its whole table: sfdisk writes it (--no-reread skips its
        # in-use check) and partx tells the kernel of partition 4 alone
        # (BLKPG).
        echo "start=$start, $new" | sfdisk --quiet --no-reread --no-tell-kernel --append "$disk" >/run/kiln/sfdisk.log 2>&1 \
            || { why="sfdisk could not add partition 4: $(tail -n1 /run/kiln/sfdisk.log)"; return 1; }
        partx --add --nr 4 "$disk" >/run/kiln/partx.log 2>&1 \
            || { why="partx could not tell the kernel of partition 4: $(tail -n1 /run/kiln/partx.log)"; return 1; }
        part=$(kiln_partition_of "$disk" 4) || { why="partition 4 of $disk did not appear"; return 1; }
        mkfs.ext4 -q -F -L kiln-data "$part" >/run/kiln/mkfs.log 2>&1 \
            || { why="mkfs.ext4 on $part failed: $(tail -n1 /run/kiln/mkfs.log)"; return 1; }
        return 0
    fi
    part=$(kiln_partition_of "$disk" 4) || { why="partition 4 of $disk is in its table but not known to the kernel"; return 1; }
    fs=$(blkid "$part" 2>/dev/null)
    case "$fs" in
        *'LABEL="kiln-data"'*) ;;
        "")
            # Made at an earlier boot that stopped before mkfs finished.
            log "partition 4 of $disk holds no filesystem: making ext4 labelled kiln-data on it"
            mkfs.ext4 -q -F -L kiln-data "$part" >/run/kiln/mkfs.log 2>&1 \
                || { why="mkfs.ext4 on $part failed: $(tail -n1 /run/kiln/mkfs.log)"; return 1; }
            ;;
        *) why="partition 4 of $disk is not kiln's ($fs): left alone"; return 1 ;;
    esac
    end4=$((${10} + ${11}))
    if [ $((last - end4)) -ge 2048 ]; then
        log "growing the data partition $part from $((${11} / 2048)) MiB to the end of $disk"
        if ! echo ", +" | sfdisk --quiet --no-reread --no-tell-kernel -N 4 "$disk" >/run/kiln/sfdisk.log 2>&1; then
            log "growing partition 4 of $disk failed: $(tail -n1 /run/kiln/sfdisk.log); it keeps its size"
        elif ! partx --update --nr 4 "$disk" >/run/kiln/partx.log 2>&1; then
            log "partx could not tell the kernel partition 4 of $disk grew: $(tail -n1 /run/kiln/partx.log); it grows at the next boot"
        fi
    fi
}

# Grows the mounted data partition $1's filesystem (ext4 grows online) to
# the partition's size: after kiln_data_card grew the partition, or at the
# boot after one that grew the partition but not the filesystem.
kiln_data_grow_fs() {
    if ! resize2fs "$1" >/run/kiln/resize2fs.log 2>&1; then
        log "resize2fs $1 failed: $(tail -n1 /run/kiln/resize2fs.log)"
    elif ! grep -q "Nothing to do" /run/kiln/resize2fs.log; then
        log "data partition $1 grown: $(df -h "$data" | awk 'NR == 2 { print $2 }')"
    fi
}

# A/B slots of a disk image (GPT: ESP, kiln-root-a, kiln-root-b): k3s has
# started on the slot this boot came from (kiln.root=PARTLABEL=kiln-root-X),
# so its boot-counting loader entry (loader/entries/kiln-X+N[-M].conf, which
# `kiln update` writes) becomes a plain kiln-X.conf: good, and no longer
# counted. Nothing to do for slots already good, netboot or SD cards.
kiln_mark_slot_good() {
    case "$KILN_ROOT" in
        PARTLABEL=kiln-root-a) slot=a ;;
        PARTLABEL=kiln-root-b) slot=b ;;
        *) return 0 ;;
    esac
    [ -s /run/kiln/root.env ] && . /run/kiln/root.env
    [ -n "$KILN_ROOT_DISK" ] || return 0
    esp=$(kiln_partition_of "$KILN_ROOT_DISK" 1) || return 0
    mkdir -p /run/kiln/esp
    modprobe -q vfat 2>/dev/null
    if ! mount -t vfat -o rw,nosuid,nodev,noexec "$esp" /run/kiln/esp 2>/run/kiln/mount.err; then
        log "slot $slot: mounting the ESP $esp failed ($(head -n1 /run/kiln/mount.err)); not marked good"
        return 1
    fi
    for e in /run/kiln/esp/loader/entries/kiln-"$slot"+*.conf; do
        [ -f "$e" ] || continue
        if mv "$e" "/run/kiln/esp/loader/entries/kiln-$slot.conf"; then
            log "slot $slot marked good (${e##*/} -> kiln-$slot.conf)"
        else
            log "slot $slot: renaming ${e##*/} failed; not marked good"
        fi
    done
    sync
    umount /run/kiln/esp
}
