//! Read-only TFTP server (RFC 1350) for `kiln serve`: iPXE binaries and
//! Raspberry Pi boot files.
//!
//! - Options: blksize (RFC 2348), timeout and tsize (RFC 2349), windowsize
//!   (RFC 7440), negotiated by OACK (RFC 2347); see [`options`].
//! - Modes: octet, and netascii converted on the fly (LF to CR LF, CR to
//!   CR NUL); tsize is answered in netascii only for in-memory files (the
//!   converted size of a disk file is not known without reading it).
//!   "mail" is refused with ERROR 4. Writes are refused with ERROR 2.
//! - Block numbers roll over from 65535 to 0, so files of any size transfer.
//! - Each transfer runs on its own ephemeral socket (its TID); strangers get
//!   ERROR 5; a client ERROR ends the transfer at once.
//! - Files come from a [`FileSource`]: a [`RootDir`] that no path leaves,
//!   [`VirtualFiles`] in memory, a per-client closure ([`FnSource`]) or a
//!   [`Chain`] of these. Path policy in [`files`].
//! - Requests from one address and port, floods and the transfer limit:
//!   see [`server`]. Retransmission and windows: see [`transfer`].
//! - A window goes out in one system call: UDP GSO where the kernel takes
//!   it (Linux 4.18+, segments of at least 516 bytes), else sendmmsg.
//! - Replies leave from a socket bound to the listening address: bind the
//!   server to the address clients reach (with 0.0.0.0 on a multi-homed
//!   host the kernel picks the source address by route). Set
//!   [`Limits::max_blksize`] to the interface MTU less 32 (IPv4) or 52
//!   (IPv6) so that blocks are not fragmented.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use kiln_netboot_server::tftp::{Chain, RootDir, TftpServer, VirtualFiles};
//! let virt = Arc::new(VirtualFiles::new());
//! let source = Chain::new().then(virt.clone()).then(RootDir::new("/srv/tftp")?);
//! let server = TftpServer::bind("0.0.0.0:69".parse().unwrap(), Arc::new(source)).await?;
//! let stats = server.stats();
//! server.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! println!("{:?}", stats.snapshot());
//! # Ok(()) }
//! ```

pub mod files;
pub mod options;
pub mod packet;
pub mod server;
pub mod transfer;

pub use files::{
    sanitize_path, Chain, FileSource, FnSource, RootDir, TftpError, TftpFile, VirtualFiles,
};
pub use options::{negotiate, Limits, Negotiated};
pub use packet::{ErrorCode, Mode, Packet, Request};
pub use server::{TftpConfig, TftpServer, TftpStats, TftpStatsSnapshot};
