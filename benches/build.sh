#!/usr/bin/env bash
# Build benchmark (`just bench-build`): warm-cache build time and peak memory
# of images/pxe-x86_64.toml, a rebuild after one overlay file changed, and
# artifact sizes. Needs the Debian mirror (or a warm $KILN_CACHE); k3s is the
# test stand-in, served from a local release layout through file://.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
kiln=$PWD/target/release/kiln
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export KILN_CACHE=${KILN_CACHE:-$PWD/target/bench-cache}

# The k3s release layout with the stand-in binary.
tag=v1.33.5+k3s1
rel=$work/releases/download/$tag
mkdir -p "$rel"
cp tests/fixtures/k3s-standin "$rel/k3s"
(cd "$rel" && sha256sum k3s >sha256sum-amd64.txt)
export KILN_K3S_URL=file://$work/releases

# The spec with one overlay, so a file can change between builds.
mkdir -p "$work/spec/overlay/etc/kiln"
sed 's/^name = .*/name = "bench-x86_64"/' images/pxe-x86_64.toml >"$work/spec/bench.toml"
echo 'overlays = ["overlay"]' | cat - "$work/spec/bench.toml" >"$work/spec/b.toml" && mv "$work/spec/b.toml" "$work/spec/bench.toml"
echo "motd 1 for {{ name }}" >"$work/spec/overlay/etc/kiln/motd.tera"

measure() { # label, then the command
    local label=$1; shift
    /usr/bin/time -f "%e %M" -o "$work/time" "$@" >"$work/out" 2>"$work/err" || { cat "$work/err"; exit 1; }
    read -r secs kb <"$work/time"
    printf '%-44s %6.2f s   peak RSS %5d MiB\n' "$label" "$secs" $((kb / 1024))
    echo "$secs"  >"$work/last"
}

echo "== warming the download cache ($KILN_CACHE)"
"$kiln" build "$work/spec/bench.toml" --out "$work/out0" >/dev/null 2>&1
echo "== pxe-x86_64 (release build of kiln, $(nproc) cores)"
rm -rf "$KILN_CACHE/squashfs"
measure "full build (warm download cache)" "$kiln" build "$work/spec/bench.toml" --out "$work/out1"
full=$(cat "$work/last")
rm -rf "$KILN_CACHE/squashfs"
measure "full build, again" "$kiln" build "$work/spec/bench.toml" --out "$work/out2"
cmp -s "$work/out1/bench-x86_64/rootfs.squashfs" "$work/out2/bench-x86_64/rootfs.squashfs" \
    && echo "  identical rootfs.squashfs in both builds" || { echo "  rootfs differs between builds!"; exit 1; }
echo "motd 2 for {{ name }}" >"$work/spec/overlay/etc/kiln/motd.tera"
measure "rebuild after one overlay file changed" "$kiln" build "$work/spec/bench.toml" --out "$work/out3"
re=$(cat "$work/last")
rm -rf "$KILN_CACHE/squashfs"
measure "same change, full build (check)" "$kiln" build "$work/spec/bench.toml" --out "$work/out4"
cmp -s "$work/out3/bench-x86_64/rootfs.squashfs" "$work/out4/bench-x86_64/rootfs.squashfs" \
    && echo "  the rebuild's rootfs is identical to a full build's" || { echo "  rebuild differs from a full build!"; exit 1; }
awk -v r="$re" -v f="$full" 'BEGIN { printf "rebuild / full build: %.0f%% (target under 25%%)\n", 100 * r / f }'

echo "== sizes"
for f in vmlinuz initrd.img rootfs.squashfs; do
    printf '%-18s %8.1f MiB\n' "$f" "$(stat -c %s "$work/out4/bench-x86_64/$f" | awk '{print $1 / 1048576}')"
done
printf 'k3s in the root     %8.1f MiB (the test stand-in; the real k3s is about 70 MiB)\n' \
    "$(stat -c %s "$rel/k3s" | awk '{print $1 / 1048576}')"
