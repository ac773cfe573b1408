# Everyday commands. `just --list` shows them.

# Build an image (default: the x86_64 PXE image) into out/<name>/.
build spec="images/pxe-x86_64.toml":
    cargo run --release -- build {{spec}}

# Run every test (what CI runs, after .ci/setup installs QEMU and friends).
test:
    cargo test --workspace

# Quick unit tests only (no network, no QEMU).
unit:
    cargo test --workspace --lib --bins

# The end-to-end boots (QEMU, TCG).
e2e:
    cargo test --test pxe_x86_64 --test pxe_aarch64 --test netboot --test cluster --test data_disk -- --nocapture

# Build benchmark: warm-cache build time, peak memory, incremental rebuild, sizes.
bench-build:
    bash benches/build.sh

fmt:
    cargo fmt --all

lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Netboot benchmark (root): TFTP vs dnsmasq, HTTP vs nginx, DHCP under perfdhcp vs dnsmasq.
bench-netboot *parts:
    bash benches/netboot.sh {{parts}}

# Serve images from out/ (proxyDHCP on IFACE).
serve iface image="pxe-x86_64":
    cargo run --release -- serve --interface {{iface}} --images out --default-image {{image}}
