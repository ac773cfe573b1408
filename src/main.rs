//! The `kiln` command line: parses arguments and dispatches to the libraries.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Immutable k3s node images, and the netboot server that boots them"
)]
struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the image a spec describes into OUT/<name>/.
    Build {
        /// The image spec (TOML), e.g. images/pxe-x86_64.toml.
        spec: PathBuf,
        /// Parent directory of the image directory.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// Build from the cache alone; fail naming whatever is missing.
        #[arg(long, env = "KILN_OFFLINE", value_parser = clap::builder::BoolishValueParser::new())]
        offline: bool,
        /// Cache directory (default: $XDG_CACHE_HOME/kiln).
        #[arg(long, env = "KILN_CACHE")]
        cache: Option<PathBuf>,
    },
    /// Serve images by network boot: DHCP (proxy or full), TFTP and HTTP.
    Serve {
        /// A config file (TOML): inventory, admission, DHCP settings, kernel arguments.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The interface to serve DHCP on (its address is the server's).
        #[arg(long)]
        interface: Option<String>,
        /// Directory of images made by `kiln build` (default: out).
        #[arg(long)]
        images: Option<PathBuf>,
        /// The image machines boot unless the inventory says otherwise.
        #[arg(long)]
        default_image: Option<String>,
        /// DHCP mode.
        #[arg(long, value_enum)]
        dhcp: Option<DhcpArg>,
        /// Address range of full DHCP, FIRST-LAST.
        #[arg(long)]
        range: Option<String>,
        /// HTTP listen address (default 0.0.0.0:8080).
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        /// The state store (SQLite; default kiln-state.db).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Cache directory for the iPXE package (default: $XDG_CACHE_HOME/kiln).
        #[arg(long, env = "KILN_CACHE")]
        cache: Option<PathBuf>,
        /// Use only the cache.
        #[arg(long, env = "KILN_OFFLINE", value_parser = clap::builder::BoolishValueParser::new())]
        offline: bool,
    },
    /// Let a machine enrol again: forget the secret it sent first, so its next
    /// node-config request is trusted (a node whose data disk was replaced).
    /// It keeps its name and role. Run it while kiln serve is stopped.
    ForgetSecret {
        /// The machine's MAC address.
        mac: String,
        /// The state store (default kiln-state.db).
        #[arg(long, default_value = "kiln-state.db")]
        state: PathBuf,
    },
    /// Write an image to an SD card or disk (or to a file), with the node's
    /// settings in its boot partition (kiln.yaml), then read it back and check it.
    Flash {
        /// The image, e.g. out/rpi4/sdcard.img.
        image: PathBuf,
        /// The whole disk to overwrite (e.g. /dev/sdb, /dev/mmcblk0), or a file.
        device: PathBuf,
        /// The node's host name (lower case a-z, 0-9, '-').
        #[arg(long)]
        hostname: Option<String>,
        /// The node's role: server or agent.
        #[arg(long)]
        role: Option<String>,
        /// URL of the kiln serve the node asks for its config, e.g. http://10.0.0.1:8080.
        #[arg(long)]
        server: Option<String>,
        /// A node config (YAML: hostname, role, server, data_disk, k3s) to write;
        /// --hostname, --role and --server override its keys.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overwrite without asking.
        #[arg(long, short)]
        yes: bool,
    },
    /// Make a NoCloud seed image for a cloud VM: a FAT volume labelled
    /// CIDATA holding the node's settings as user-data (kiln.yaml's format)
    /// and cloud-init's meta-data.
    Seed {
        /// The image file to write (mode 0600), e.g. seed.img.
        out: PathBuf,
        /// A node config (YAML: hostname, role, server, data_disk, k3s) to write;
        /// --hostname, --role and --server override its keys.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The node's host name (lower case a-z, 0-9, '-').
        #[arg(long)]
        hostname: Option<String>,
        /// The node's role: server or agent.
        #[arg(long)]
        role: Option<String>,
        /// URL of the kiln serve the node asks for its config, e.g. http://10.0.0.1:8080.
        #[arg(long)]
        server: Option<String>,
        /// meta-data's instance-id (default: kiln-<first 16 hex of the user-data's sha256>).
        #[arg(long)]
        instance_id: Option<String>,
    },
    /// A/B update of a kiln disk: write the image's root, kernel and
    /// initramfs into the slot the disk does not boot now, and make it the
    /// one systemd-boot tries next (3 tries, then back to the other slot).
    Update {
        /// The disk: a disk image file or a block device (not mounted).
        disk: PathBuf,
        /// The new image's directory (disk.raw and manifest.json), e.g. out/cloud-x86_64.
        image: PathBuf,
    },
    /// Show what an image holds and check its artifacts against manifest.json.
    Inspect {
        /// An image directory, e.g. out/pxe-x86_64.
        dir: PathBuf,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DhcpArg {
    Proxy,
    Full,
    Off,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Build {
            spec,
            out,
            offline,
            cache,
        } => {
            let spec = kiln_builder::spec::Spec::load(&spec)?;
            let cache = match cache {
                Some(dir) => kiln_builder::cache::Cache::new(dir),
                None => kiln_builder::cache::Cache::from_env()?,
            };
            let fetcher = kiln_builder::fetch::Fetcher::new(cache, offline)?;
            let opts = kiln_builder::build::BuildOptions { out, fetcher };
            let report = kiln_builder::build::build(&spec, &opts)?;
            print!("{}", kiln_builder::build::summary(&report));
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            config,
            interface,
            images,
            default_image,
            dhcp,
            range,
            http,
            state,
            cache,
            offline,
        } => {
            use kiln_netboot_server::config::{DhcpMode, Flags, ServeConfig};
            let flags = Flags {
                config,
                interface,
                images,
                default_image,
                dhcp: dhcp.map(|d| match d {
                    DhcpArg::Proxy => DhcpMode::Proxy,
                    DhcpArg::Full => DhcpMode::Full,
                    DhcpArg::Off => DhcpMode::Off,
                }),
                range,
                http,
                state,
            };
            let cfg = ServeConfig::load(&flags)?;
            let cache = match cache {
                Some(dir) => kiln_builder::cache::Cache::new(dir),
                None => kiln_builder::cache::Cache::from_env()?,
            };
            let fetcher = kiln_builder::fetch::Fetcher::new(cache, offline)?;
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(kiln_netboot_server::serve::run(
                cfg,
                fetcher,
                shutdown_signal(),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ForgetSecret { mac, state } => {
            let store = kiln_netboot_server::state::State::open(&state)?;
            if store.forget_secret(&mac)? {
                println!("{mac}: its next node-config request enrols it again");
                Ok(ExitCode::SUCCESS)
            } else {
                anyhow::bail!("{mac} is not a cluster member in {}", state.display())
            }
        }
        Command::Flash {
            image,
            device,
            hostname,
            role,
            server,
            config,
            yes,
        } => {
            use kiln_builder::flash::{flash, Flags, Options};
            let report = flash(&Options {
                image,
                target: device,
                flags: Flags {
                    hostname,
                    role,
                    server,
                },
                config,
                yes,
            })?;
            print!("{}", report.render());
            Ok(ExitCode::SUCCESS)
        }
        Command::Update { disk, image } => {
            let r = kiln_builder::update::update(&disk, &image)?;
            println!(
                "{}: slot {} holds {} now ({} bytes of root, sha256 {}); loader entry {} (version {}) boots it next, {} tries",
                disk.display(),
                r.slot,
                image.display(),
                r.root_bytes,
                r.root_sha256,
                r.entry,
                r.version,
                kiln_builder::update::TRIES
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Seed {
            out,
            config,
            hostname,
            role,
            server,
            instance_id,
        } => {
            use kiln_builder::{flash::Flags, seed};
            let report = seed::seed(&seed::Options {
                out,
                config,
                flags: Flags {
                    hostname,
                    role,
                    server,
                },
                instance_id,
            })?;
            print!("{}", report.render());
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { dir, json } => {
            let i = kiln_builder::inspect::inspect(&dir)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&i.manifest)
                        .context("serialising the manifest")?
                );
            } else {
                print!("{}", kiln_builder::inspect::render(&i));
            }
            Ok(if i.all_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
