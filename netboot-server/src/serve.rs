//! `kiln serve`: the state store, the iPXE binaries, and the TFTP, HTTP and
//! DHCP servers, run together until shutdown.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kiln_builder::fetch::Fetcher;
use tokio::sync::watch;

use crate::config::{DhcpMode, ServeConfig};
use crate::dhcp::{self, BootFiles, DhcpConfig, DhcpServer, Pool, ServerOptions};
use crate::http::{self, HttpContext};
use crate::leases::SqlLeaseStore;
use crate::metrics::Metrics;
use crate::state::State;
use crate::tftp::{Chain, FileSource, TftpServer, VirtualFiles};

/// The Debian suite whose `ipxe` package provides the iPXE binaries.
pub const IPXE_SUITE: &str = "trixie";

/// The IPv4 address and netmask of a network interface.
pub fn interface_ipv4(name: &str) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let addrs = if_addrs::get_if_addrs().context("listing the network interfaces")?;
    if !addrs.iter().any(|a| a.name == name) {
        bail!("there is no network interface {name:?}");
    }
    addrs
        .iter()
        .filter(|a| a.name == name)
        .find_map(|a| match &a.addr {
            if_addrs::IfAddr::V4(v4) => Some((v4.ip, v4.netmask)),
            if_addrs::IfAddr::V6(_) => None,
        })
        .with_context(|| format!("interface {name} has no IPv4 address"))
}

/// Runs every server of `kiln serve` until `shutdown` resolves.
pub async fn run(
    cfg: ServeConfig,
    fetcher: Fetcher,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let state = Arc::new(State::open(&cfg.state)?);
    let iface = cfg.interface.as_deref().map(interface_ipv4).transpose()?;
    let server_ip = match iface {
        Some((ip, _)) => Some(ip),
        None => match cfg.http.ip() {
            IpAddr::V4(v4) if !v4.is_unspecified() => Some(v4),
            _ => None,
        },
    };
    let public_url = match (&cfg.public_url, server_ip) {
        (Some(u), _) => u.trim_end_matches('/').to_string(),
        (None, Some(ip)) => format!("http://{ip}:{}", cfg.http.port()),
        (None, None) => {
            bail!("cannot tell the URL nodes reach this server at: set --interface or public_url")
        }
    };
    check_default_image(&cfg.images, &cfg.default_image)?;

    let ipxe = tokio::task::spawn_blocking({
        let fetcher = fetcher.clone();
        move || {
            crate::ipxe::fetch(
                &fetcher,
                IPXE_SUITE,
                Path::new(kiln_builder::spec::DEFAULT_KEYRING),
            )
        }
    })
    .await
    .context("fetching the iPXE binaries")??;
    let files = VirtualFiles::new();
    for (name, bytes) in &ipxe.files {
        files
            .insert(name, bytes.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    // iPXE binaries first; any other name is a Raspberry Pi's boot file.
    let pi = crate::rpi::PiFiles::from_config(
        &cfg,
        state.clone(),
        &public_url,
        crate::rpi::system_neighbour,
    );
    let source: Arc<dyn FileSource> = Arc::new(Chain::new().then(files).then(pi));

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let metrics = Arc::new(Metrics::default());
    let tftp_addr = SocketAddr::new(IpAddr::V4(server_ip.unwrap_or(Ipv4Addr::UNSPECIFIED)), 69);
    let tftp = TftpServer::bind(tftp_addr, source)
        .await?
        .with_stats(metrics.tftp.clone());
    let tftp_task = tokio::spawn(tftp.run(stopped(stop_rx.clone())));

    // Made once (OS CSPRNG) and kept in the state store, which only its
    // owner can read.
    let token = state.cluster_token()?;
    let ctx = Arc::new(HttpContext {
        images: cfg.images.clone(),
        public_url: public_url.clone(),
        default_image: cfg.default_image.clone(),
        machines: cfg.machines.clone(),
        admission: cfg.admission,
        kernel_args: cfg.kernel_args.clone(),
        state: state.clone(),
        metrics: metrics.clone(),
        ipxe: ipxe.files.clone(),
        artifacts: Default::default(),
        cluster: cfg.cluster.clone(),
        token,
    });
    let dhcp_task = if cfg.dhcp == DhcpMode::Off {
        None
    } else {
        let server_addr = server_ip
            .context("DHCP needs the server's address on the boot network (--interface)")?;
        let mode = match &cfg.full {
            Some(f) => dhcp::Mode::Full(
                Pool::from_settings(f, iface.map(|(_, mask)| mask), server_addr).map_err(|e| {
                    anyhow::anyhow!("full DHCP (dhcp.range, dhcp.subnet_mask): {e}")
                })?,
            ),
            None => dhcp::Mode::Proxy,
        };
        let opts = ServerOptions::standard(cfg.interface.clone(), &mode);
        let config = DhcpConfig {
            mode,
            server_addr,
            boot: BootFiles::with_http_base(&public_url),
        };
        // The inventory is the config's [[machine]] list.
        let inventory = Arc::new(cfg.clone());
        let leases: dhcp::server::SharedLeases = Arc::new(std::sync::Mutex::new(Box::new(
            SqlLeaseStore::new(state.clone())?,
        )));
        let server = Arc::new(
            DhcpServer::new(
                config,
                cfg.admission,
                inventory,
                leases,
                metrics.dhcp.clone(),
            )
            .with_state(state.clone()),
        );
        Some(tokio::spawn(server.run(opts, stopped(stop_rx.clone()))))
    };

    let listener = tokio::net::TcpListener::bind(cfg.http)
        .await
        .with_context(|| format!("binding the HTTP server to {}", cfg.http))?;
    // Node configs name the first control plane by the address its request
    // came from.
    let app = http::router(ctx).into_make_service_with_connect_info::<SocketAddr>();
    let http_task = tokio::spawn({
        let rx = stop_rx.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped(rx))
                .await
        }
    });
    tracing::info!(
        %public_url, tftp = %tftp_addr, http = %cfg.http, dhcp = ?cfg.dhcp, ipxe = %ipxe.version,
        "kiln serve is up"
    );

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    tftp_task
        .await
        .context("the TFTP server panicked")?
        .context("TFTP server")?;
    http_task
        .await
        .context("the HTTP server panicked")?
        .context("HTTP server")?;
    if let Some(t) = dhcp_task {
        t.await
            .context("the DHCP server panicked")?
            .context("DHCP server")?;
    }
    Ok(())
}

fn check_default_image(images: &Path, name: &str) -> Result<()> {
    kiln_builder::manifest::Manifest::load(&images.join(name)).with_context(|| {
        format!(
            "the default image {name} in {} (build it with `kiln build`)",
            images.display()
        )
    })?;
    Ok(())
}
