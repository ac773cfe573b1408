//! The configuration of `kiln serve`: a TOML file (optional) and command-line
//! flags that override it. Errors name the file, the key and the line, as the
//! image spec's do.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Deserialize;
use toml::Spanned;

use crate::state::normalize_mac;

/// How the server takes part in DHCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// proxyDHCP: boot information for PXE clients only, beside the site's DHCP server.
    #[default]
    Proxy,
    /// A full DHCP server for a range of addresses.
    Full,
    /// No DHCP (another server points clients here).
    Off,
}

/// Who may boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Admission {
    /// Only machines listed in the inventory.
    Allowlist,
    /// Every machine that asks.
    #[default]
    Auto,
}

/// The role of a machine in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Server,
    Agent,
}

impl Role {
    /// As in the config and the node config: `server` or `agent`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }
}

impl Admission {
    /// Whether a machine with this inventory entry (or none) may boot.
    pub fn admits(self, entry: Option<&Machine>) -> bool {
        match self {
            Admission::Auto => true,
            Admission::Allowlist => entry.is_some(),
        }
    }
}

/// A machine of the inventory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Machine {
    /// Lower-case, colon-separated. A machine is named by its MAC, its serial
    /// (Raspberry Pi) or its UUID (SMBIOS), at least one.
    pub mac: Option<String>,
    /// A Raspberry Pi's serial: 8 lower-case hex digits.
    pub serial: Option<String>,
    /// SMBIOS UUID, lower-case with hyphens.
    pub uuid: Option<String>,
    pub hostname: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub image: Option<String>,
    pub role: Option<Role>,
    /// Reserved address (full DHCP mode).
    pub address: Option<Ipv4Addr>,
    /// k3s taints (`key=value:Effect`).
    pub taints: Vec<String>,
    /// A blank disk the node partitions and formats for `kiln-data`
    /// (overrides the cluster's).
    pub data_disk: Option<String>,
}

/// Full-mode DHCP settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FullDhcp {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
    /// `None`: the serving interface's netmask.
    pub subnet_mask: Option<Ipv4Addr>,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub lease_seconds: u32,
}

/// The machine of an inventory with this MAC (normalised), else the one with
/// this serial, else the one with this UUID.
pub fn find_machine<'a>(
    machines: &'a [Machine],
    mac: &str,
    serial: Option<&str>,
    uuid: Option<&str>,
) -> Option<&'a Machine> {
    let by = |f: fn(&Machine) -> Option<&str>, v: Option<&str>| {
        v.and_then(|v| machines.iter().find(|m| f(m) == Some(v)))
    };
    by(|m| m.mac.as_deref(), Some(mac))
        .or_else(|| by(|m| m.serial.as_deref(), serial))
        .or_else(|| by(|m| m.uuid.as_deref(), uuid))
}

/// The whole, validated configuration.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub interface: Option<String>,
    pub images: PathBuf,
    pub default_image: String,
    pub state: PathBuf,
    pub http: SocketAddr,
    /// The URL nodes reach the HTTP server at; when unset, derived from the
    /// interface's address and the HTTP port.
    pub public_url: Option<String>,
    pub dhcp: DhcpMode,
    pub full: Option<FullDhcp>,
    pub admission: Admission,
    /// Extra kernel arguments per image.
    pub kernel_args: BTreeMap<String, String>,
    pub machines: Vec<Machine>,
    pub cluster: Cluster,
}

/// Where nodes reach the Kubernetes API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiEndpoint {
    /// The address of the first control plane (its `cluster-init` node), as
    /// its node-config requests come from.
    FirstControlPlane,
    /// A fixed URL (`https://HOST:PORT`), e.g. a load balancer or a VIP.
    Fixed(String),
}

/// The cluster nodes join: `[cluster]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// Names the generated hostnames (`<name>-server-1`, `<name>-agent-1`).
    pub name: String,
    /// Control-plane nodes: 1 or 3 (etcd needs an odd number).
    pub control_planes: u8,
    pub api: ApiEndpoint,
    /// The default blank disk for `kiln-data`, e.g. `/dev/vda`.
    pub data_disk: Option<String>,
    /// Extra k3s settings (config.yaml keys) for servers and for agents.
    pub server: BTreeMap<String, serde_json::Value>,
    pub agent: BTreeMap<String, serde_json::Value>,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            name: "kiln".into(),
            control_planes: 1,
            api: ApiEndpoint::FirstControlPlane,
            data_disk: None,
            server: BTreeMap::new(),
            agent: BTreeMap::new(),
        }
    }
}

/// k3s settings kiln sets itself: they may not be given in `[cluster.server]`
/// or `[cluster.agent]`.
pub const RESERVED_K3S_KEYS: &[&str] = &[
    "token",
    "token-file",
    "server",
    "cluster-init",
    "node-name",
    "node-label",
    "node-taint",
    "agent-token",
];

/// Command-line flags; `Some` overrides the file.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub interface: Option<String>,
    pub images: Option<PathBuf>,
    pub default_image: Option<String>,
    pub dhcp: Option<DhcpMode>,
    /// `FIRST-LAST`.
    pub range: Option<String>,
    pub http: Option<SocketAddr>,
    pub state: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: Option<String>,
    images: Option<String>,
    default_image: Option<String>,
    state: Option<String>,
    http: Option<Spanned<String>>,
    public_url: Option<String>,
    #[serde(default)]
    dhcp: RawDhcp,
    #[serde(default)]
    admission: RawAdmission,
    #[serde(default, rename = "image")]
    images_config: BTreeMap<String, RawImage>,
    #[serde(default, rename = "machine")]
    machines: Vec<RawMachine>,
    #[serde(default)]
    cluster: RawCluster,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Option<Spanned<String>>,
    control_planes: Option<Spanned<u8>>,
    api: Option<Spanned<String>>,
    data_disk: Option<Spanned<String>>,
    #[serde(default)]
    server: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    agent: BTreeMap<String, Spanned<toml::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDhcp {
    mode: Option<DhcpMode>,
    range: Option<Spanned<String>>,
    subnet_mask: Option<Ipv4Addr>,
    router: Option<Ipv4Addr>,
    #[serde(default)]
    dns: Vec<Ipv4Addr>,
    lease_seconds: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmission {
    policy: Option<Admission>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    #[serde(default)]
    kernel_args: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMachine {
    mac: Option<Spanned<String>>,
    serial: Option<Spanned<String>>,
    uuid: Option<Spanned<String>>,
    hostname: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    image: Option<String>,
    role: Option<Role>,
    address: Option<Ipv4Addr>,
    #[serde(default)]
    taints: Vec<String>,
    data_disk: Option<Spanned<String>>,
}

/// A hostname as Kubernetes takes a node name: an RFC 1123 DNS label (lower
/// case letters, digits and '-', 1 to 63 characters, no '-' at either end).
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && !h.starts_with('-')
        && !h.ends_with('-')
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A disk the node may format: an absolute /dev path, shell-safe.
fn valid_disk(d: &str) -> bool {
    d.starts_with("/dev/")
        && d.len() > 5
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_-.:".contains(&b))
        && !d.contains("..")
}

/// The `server:` URL for `[cluster] api`: an address, `HOST:PORT`, or an
/// https URL; the port defaults to 6443.
pub fn api_url(api: &str) -> Result<String, String> {
    let a = api.trim();
    let rest = a.strip_prefix("https://").unwrap_or(a);
    if a.starts_with("http://") || rest.is_empty() {
        return Err(format!(
            "{api:?} is not an API address (e.g. 10.0.0.10, 10.0.0.10:6443 or https://k8s.example:6443)"
        ));
    }
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') || h.ends_with(']') => match p.parse::<u16>() {
            Ok(p) => (h, p),
            Err(_) => return Err(format!("{api:?}: {p:?} is not a port")),
        },
        _ => (rest, 6443),
    };
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    if !ok {
        return Err(format!("{api:?}: {host:?} is not a host name or address"));
    }
    Ok(format!("https://{host}:{port}"))
}

/// A TOML value as the JSON (and so YAML) value k3s's config.yaml takes.
fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    match v {
        toml::Value::String(s) => s.clone().into(),
        toml::Value::Integer(i) => (*i).into(),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        toml::Value::Boolean(b) => (*b).into(),
        toml::Value::Datetime(d) => d.to_string().into(),
        toml::Value::Array(a) => a.iter().map(toml_to_json).collect(),
        toml::Value::Table(t) => t
            .iter()
            .map(|(k, v)| (k.clone(), toml_to_json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    }
}

/// A Raspberry Pi serial as its TFTP directory names it: 8 hex digits,
/// lower-case (`0x` and upper case accepted).
pub fn normalize_serial(s: &str) -> Result<String, String> {
    let t = s.trim().trim_start_matches("0x").to_ascii_lowercase();
    if t.len() != 8 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a Raspberry Pi serial (8 hex digits, e.g. e5ef6e9d)"
        ));
    }
    Ok(t)
}

/// A UUID in the usual 8-4-4-4-12 form, lower-case.
pub fn normalize_uuid(s: &str) -> Result<String, String> {
    let t = s.trim().to_ascii_lowercase();
    let groups: Vec<&str> = t.split('-').collect();
    let ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok {
        return Err(format!(
            "{s:?} is not a UUID (e.g. 00112233-4455-6677-8899-aabbccddeeff)"
        ));
    }
    Ok(t)
}

/// Parses `FIRST-LAST` into two addresses, first <= last.
pub fn parse_range(s: &str) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let Some((a, b)) = s.split_once('-') else {
        bail!("range {s:?} is not FIRST-LAST (e.g. 10.0.0.100-10.0.0.200)");
    };
    let first: Ipv4Addr = a
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("range {s:?}: {a:?} is not an IPv4 address"))?;
    let last: Ipv4Addr = b
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("range {s:?}: {b:?} is not an IPv4 address"))?;
    if u32::from(first) > u32::from(last) {
        bail!("range {s:?} ends before it starts");
    }
    Ok((first, last))
}

impl ServeConfig {
    /// Reads the config file named by the flags (if any) and applies the flags.
    pub fn load(flags: &Flags) -> Result<ServeConfig> {
        let (raw, file, text) = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("{}: cannot read the config: {e}", path.display())
                })?;
                (parse_raw(path, &text)?, Some(path.clone()), text)
            }
            None => (RawConfig::default(), None, String::new()),
        };
        build(raw, file.as_deref(), &text, flags)
    }
}

fn at(
    file: Option<&Path>,
    text: &str,
    span: Option<std::ops::Range<usize>>,
    key: &str,
    msg: String,
) -> anyhow::Error {
    let name = file.map_or_else(|| "command line".to_string(), |f| f.display().to_string());
    let mut out = name;
    if let Some(s) = span {
        let (line, col) = kiln_builder::spec::line_col(text, s.start);
        out.push_str(&format!(":{line}:{col}"));
    }
    if !key.is_empty() {
        out.push_str(&format!(": {key}"));
    }
    anyhow::anyhow!("{out}: {msg}")
}

fn parse_raw(path: &Path, text: &str) -> Result<RawConfig> {
    let de = toml::Deserializer::parse(text)
        .map_err(|e| at(Some(path), text, e.span(), "", e.message().to_string()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        at(
            Some(path),
            text,
            inner.span(),
            if key == "." { "" } else { &key },
            inner.message().to_string(),
        )
    })
}

fn build(raw: RawConfig, file: Option<&Path>, text: &str, flags: &Flags) -> Result<ServeConfig> {
    let http = match (&flags.http, &raw.http) {
        (Some(a), _) => *a,
        (None, Some(s)) => s.get_ref().parse().map_err(|_| {
            at(
                file,
                text,
                Some(s.span()),
                "http",
                format!("{:?} is not ADDRESS:PORT", s.get_ref()),
            )
        })?,
        (None, None) => "0.0.0.0:8080".parse().expect("valid"),
    };
    let images = flags
        .images
        .clone()
        .or(raw.images.map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("out"));
    let Some(default_image) = flags.default_image.clone().or(raw.default_image) else {
        return Err(at(
            file,
            text,
            None,
            "default_image",
            "is not set (--default-image NAME)".into(),
        ));
    };
    let dhcp = flags.dhcp.or(raw.dhcp.mode).unwrap_or_default();
    let range = match (&flags.range, &raw.dhcp.range) {
        (Some(r), _) => {
            Some(parse_range(r).map_err(|e| at(None, "", None, "--range", format!("{e:#}")))?)
        }
        (None, Some(r)) => Some(
            parse_range(r.get_ref())
                .map_err(|e| at(file, text, Some(r.span()), "dhcp.range", format!("{e:#}")))?,
        ),
        (None, None) => None,
    };
    let full = match (dhcp, range) {
        (DhcpMode::Full, None) => {
            return Err(at(
                file,
                text,
                None,
                "dhcp.range",
                "full DHCP needs a range (--range FIRST-LAST)".into(),
            ))
        }
        (DhcpMode::Full, Some((first, last))) => Some(FullDhcp {
            first,
            last,
            subnet_mask: raw.dhcp.subnet_mask,
            router: raw.dhcp.router,
            dns: raw.dhcp.dns,
            lease_seconds: raw.dhcp.lease_seconds.unwrap_or(3600),
        }),
        _ => None,
    };
    let interface = flags.interface.clone().or(raw.interface);
    if dhcp != DhcpMode::Off && interface.is_none() {
        return Err(at(
            file,
            text,
            None,
            "interface",
            "DHCP needs an interface (--interface IFACE, or --dhcp off)".into(),
        ));
    }
    let mut machines: Vec<Machine> = Vec::new();
    for (i, m) in raw.machines.into_iter().enumerate() {
        let field = |name: &str| format!("machine[{i}].{name}");
        let mac = match &m.mac {
            Some(mac) => Some(normalize_mac(mac.get_ref()).map_err(|e| {
                at(
                    file,
                    text,
                    Some(mac.span()),
                    &field("mac"),
                    format!("{e:#}"),
                )
            })?),
            None => None,
        };
        let serial = match &m.serial {
            Some(v) => Some(
                normalize_serial(v.get_ref())
                    .map_err(|e| at(file, text, Some(v.span()), &field("serial"), e))?,
            ),
            None => None,
        };
        let uuid = match &m.uuid {
            Some(v) => Some(
                normalize_uuid(v.get_ref())
                    .map_err(|e| at(file, text, Some(v.span()), &field("uuid"), e))?,
            ),
            None => None,
        };
        if mac.is_none() && serial.is_none() && uuid.is_none() {
            return Err(at(
                file,
                text,
                None,
                &format!("machine[{i}]"),
                "names no machine: set mac, serial or uuid".into(),
            ));
        }
        if m.address.is_some() && mac.is_none() {
            return Err(at(
                file,
                text,
                None,
                &field("address"),
                "a reserved address needs the machine's mac".into(),
            ));
        }
        let twice = |name: &str, span: Option<std::ops::Range<usize>>, v: &str| {
            Err(at(
                file,
                text,
                span,
                &field(name),
                format!("{v} is listed twice"),
            ))
        };
        if let (Some(v), Some(raw)) = (&mac, &m.mac) {
            if machines.iter().any(|o| o.mac.as_ref() == Some(v)) {
                return twice("mac", Some(raw.span()), v);
            }
        }
        if let (Some(v), Some(raw)) = (&serial, &m.serial) {
            if machines.iter().any(|o| o.serial.as_ref() == Some(v)) {
                return twice("serial", Some(raw.span()), v);
            }
        }
        if let (Some(v), Some(raw)) = (&uuid, &m.uuid) {
            if machines.iter().any(|o| o.uuid.as_ref() == Some(v)) {
                return twice("uuid", Some(raw.span()), v);
            }
        }
        if let Some(h) = m.hostname.as_deref().filter(|h| !valid_hostname(h)) {
            return Err(at(
                file,
                text,
                None,
                &field("hostname"),
                format!(
                    "{h:?} is not a node name (lower-case letters, digits and '-', at most 63)"
                ),
            ));
        }
        for t in &m.taints {
            if !valid_taint(t) {
                return Err(at(
                    file,
                    text,
                    None,
                    &field("taints"),
                    format!(
                        "{t:?} is not a taint (KEY[=VALUE]:NoSchedule|PreferNoSchedule|NoExecute)"
                    ),
                ));
            }
        }
        for (k, v) in &m.labels {
            let ok = |s: &str, max: usize| {
                s.len() <= max
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
            };
            if k.is_empty() || !ok(k, 253) || !ok(v, 63) || v.contains('/') {
                return Err(at(
                    file,
                    text,
                    None,
                    &field("labels"),
                    format!("{k:?} = {v:?} is not a Kubernetes label"),
                ));
            }
        }
        let data_disk = match &m.data_disk {
            Some(d) if !valid_disk(d.get_ref()) => {
                return Err(at(
                    file,
                    text,
                    Some(d.span()),
                    &field("data_disk"),
                    format!("{:?} is not a disk (e.g. /dev/vda)", d.get_ref()),
                ))
            }
            d => d.as_ref().map(|d| d.get_ref().clone()),
        };
        machines.push(Machine {
            mac,
            serial,
            uuid,
            hostname: m.hostname,
            labels: m.labels,
            image: m.image,
            role: m.role,
            address: m.address,
            taints: m.taints,
            data_disk,
        });
    }
    for (i, a) in machines.iter().enumerate() {
        if let Some(h) = &a.hostname {
            if machines[..i].iter().any(|b| b.hostname.as_ref() == Some(h)) {
                return Err(at(
                    file,
                    text,
                    None,
                    &format!("machine[{i}].hostname"),
                    format!("{h} is listed twice"),
                ));
            }
        }
    }
    let cluster = cluster(raw.cluster, file, text)?;
    let fixed_servers = machines
        .iter()
        .filter(|m| m.role == Some(Role::Server))
        .count();
    if fixed_servers > usize::from(cluster.control_planes) {
        return Err(at(
            file,
            text,
            None,
            "machine",
            format!(
                "{fixed_servers} machines have role = \"server\", more than cluster.control_planes = {}",
                cluster.control_planes
            ),
        ));
    }
    Ok(ServeConfig {
        interface,
        images,
        default_image,
        state: flags
            .state
            .clone()
            .or(raw.state.map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("kiln-state.db")),
        http,
        public_url: raw.public_url,
        dhcp,
        full,
        admission: raw.admission.policy.unwrap_or_default(),
        kernel_args: raw
            .images_config
            .into_iter()
            .map(|(k, v)| (k, v.kernel_args))
            .collect(),
        machines,
        cluster,
    })
}

/// A k3s taint: `KEY[=VALUE]:EFFECT`.
fn valid_taint(t: &str) -> bool {
    let Some((kv, effect)) = t.rsplit_once(':') else {
        return false;
    };
    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
    let ok = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    };
    !k.is_empty()
        && ok(k)
        && ok(v)
        && matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute")
}

fn cluster(raw: RawCluster, file: Option<&Path>, text: &str) -> Result<Cluster> {
    let mut c = Cluster::default();
    if let Some(n) = raw.name {
        // Generated hostnames are `<name>-server-<n>`: the name must leave room.
        if !valid_hostname(n.get_ref()) || n.get_ref().len() > 40 {
            return Err(at(
                file,
                text,
                Some(n.span()),
                "cluster.name",
                format!(
                    "{:?} is not a cluster name (lower-case letters, digits and '-', at most 40)",
                    n.get_ref()
                ),
            ));
        }
        c.name = n.into_inner();
    }
    if let Some(n) = raw.control_planes {
        if !matches!(*n.get_ref(), 1 | 3) {
            return Err(at(
                file,
                text,
                Some(n.span()),
                "cluster.control_planes",
                format!(
                    "{} control planes: choose 1 or 3 (etcd needs an odd number; 3 survives the loss of one)",
                    n.get_ref()
                ),
            ));
        }
        c.control_planes = *n.get_ref();
    }
    if let Some(a) = raw.api {
        c.api = ApiEndpoint::Fixed(
            api_url(a.get_ref()).map_err(|e| at(file, text, Some(a.span()), "cluster.api", e))?,
        );
    }
    if let Some(d) = raw.data_disk {
        if !valid_disk(d.get_ref()) {
            return Err(at(
                file,
                text,
                Some(d.span()),
                "cluster.data_disk",
                format!("{:?} is not a disk (e.g. /dev/vda)", d.get_ref()),
            ));
        }
        c.data_disk = Some(d.into_inner());
    }
    for (role, table, out) in [
        ("server", raw.server, &mut c.server),
        ("agent", raw.agent, &mut c.agent),
    ] {
        for (k, v) in table {
            if RESERVED_K3S_KEYS.contains(&k.as_str()) {
                return Err(at(
                    file,
                    text,
                    Some(v.span()),
                    &format!("cluster.{role}.{k}"),
                    "is set by kiln for each node; it cannot be configured here".into(),
                ));
            }
            out.insert(k, toml_to_json(v.get_ref()));
        }
    }
    Ok(c)
}

impl ServeConfig {
    /// The inventory entry of a MAC.
    pub fn machine(&self, mac: &str) -> Option<&Machine> {
        let mac = normalize_mac(mac).ok()?;
        find_machine(&self.machines, &mac, None, None)
    }

    /// See [`find_machine`].
    pub fn find_machine(
        &self,
        mac: &str,
        serial: Option<&str>,
        uuid: Option<&str>,
    ) -> Option<&Machine> {
        find_machine(&self.machines, mac, serial, uuid)
    }

    /// Whether a MAC may boot under the admission policy.
    pub fn admits(&self, mac: &str) -> bool {
        self.admission.admits(self.machine(mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interface = "kiln0"
images = "/srv/kiln"
default_image = "pxe-x86_64"

[dhcp]
mode = "full"
range = "10.0.0.100-10.0.0.200"
router = "10.0.0.1"
dns = ["10.0.0.1"]

[admission]
policy = "allowlist"

[image.pxe-x86_64]
kernel_args = "console=ttyS0"

[[machine]]
mac = "52-54-00-00-00-01"
hostname = "cp-1"
role = "server"
labels = { zone = "a" }
"#;

    fn load(text: &str, flags: Flags) -> Result<ServeConfig> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("serve.toml");
        std::fs::write(&p, text).unwrap();
        ServeConfig::load(&Flags {
            config: Some(p),
            ..flags
        })
    }

    #[test]
    fn a_good_config_loads_and_flags_override() {
        let c = load(GOOD, Flags::default()).unwrap();
        assert_eq!(c.dhcp, DhcpMode::Full);
        let full = c.full.as_ref().unwrap();
        assert_eq!(
            (full.first, full.last),
            ("10.0.0.100".parse().unwrap(), "10.0.0.200".parse().unwrap())
        );
        assert_eq!(c.kernel_args["pxe-x86_64"], "console=ttyS0");
        assert_eq!(
            c.machine("52:54:00:00:00:01").unwrap().hostname.as_deref(),
            Some("cp-1")
        );
        assert!(c.admits("52:54:00:00:00:01") && !c.admits("52:54:00:00:00:02"));
        let c = load(
            GOOD,
            Flags {
                dhcp: Some(DhcpMode::Proxy),
                images: Some("/x".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (c.dhcp, c.full.is_none(), c.images.as_path()),
            (DhcpMode::Proxy, true, Path::new("/x"))
        );
    }

    #[test]
    fn machines_are_named_by_mac_serial_or_uuid() {
        let more = r#"
[[machine]]
serial = "0xE5EF6E9D"
image = "rpi4"

[[machine]]
uuid = "00112233-4455-6677-8899-AABBCCDDEEFF"
hostname = "metal-1"
"#;
        let c = load(&format!("{GOOD}{more}"), Flags::default()).unwrap();
        let host = |mac: &str, serial: Option<&str>, uuid: Option<&str>| {
            c.find_machine(mac, serial, uuid)
                .map(|m| (m.image.clone(), m.hostname.clone()))
        };
        assert_eq!(
            host("dc:a6:32:00:00:01", Some("e5ef6e9d"), None),
            Some((Some("rpi4".into()), None))
        );
        let uuid = Some("00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(
            host("52:54:00:00:00:09", None, uuid),
            Some((None, Some("metal-1".into())))
        );
        // The MAC wins over the other identifiers.
        assert_eq!(
            host("52:54:00:00:00:01", Some("e5ef6e9d"), uuid),
            Some((None, Some("cp-1".into())))
        );
        assert_eq!(host("52:54:00:00:00:09", Some("00000001"), None), None);

        let bad = |text: &str| {
            format!(
                "{:#}",
                load(&format!("{GOOD}{text}"), Flags::default()).unwrap_err()
            )
        };
        let e = bad("[[machine]]\nserial = \"e5ef6e9\"\n");
        assert!(
            e.contains(
                "serve.toml:24:10: machine[1].serial: \"e5ef6e9\" is not a Raspberry Pi serial"
            ),
            "{e}"
        );
        let e = bad("[[machine]]\nuuid = \"0011-22\"\n");
        assert!(
            e.contains("machine[1].uuid: \"0011-22\" is not a UUID"),
            "{e}"
        );
        let e = bad("[[machine]]\nhostname = \"x\"\n");
        assert!(
            e.contains("machine[1]: names no machine: set mac, serial or uuid"),
            "{e}"
        );
        let e = bad("[[machine]]\nserial = \"e5ef6e9d\"\naddress = \"10.0.0.5\"\n");
        assert!(
            e.contains("machine[1].address: a reserved address needs the machine's mac"),
            "{e}"
        );
        let e = bad(&format!("{more}[[machine]]\nserial = \"e5ef6e9d\"\n"));
        assert!(
            e.contains("machine[3].serial: e5ef6e9d is listed twice"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_key_and_line() {
        let e = load(
            &GOOD.replace("10.0.0.100-10.0.0.200", "10.0.0.200-10.0.0.100"),
            Flags::default(),
        )
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains(
                "serve.toml:8:9: dhcp.range: range \"10.0.0.200-10.0.0.100\" ends before it starts"
            ),
            "{e}"
        );
        let e = format!(
            "{:#}",
            load(
                &GOOD.replace("\"52-54-00-00-00-01\"", "\"52-54\""),
                Flags::default()
            )
            .unwrap_err()
        );
        assert!(
            e.contains("machine[0].mac: \"52-54\" is not a MAC address"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            load(
                &GOOD.replace("mode = \"full\"", "mode = \"half\""),
                Flags::default()
            )
            .unwrap_err()
        );
        assert!(
            e.contains("serve.toml:7:8: dhcp.mode: unknown variant `half`"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            load(&GOOD.replace("interface = \"kiln0\"", ""), Flags::default()).unwrap_err()
        );
        assert!(e.contains("interface: DHCP needs an interface"), "{e}");
    }

    #[test]
    fn flags_alone_make_a_proxy_config() {
        let c = ServeConfig::load(&Flags {
            interface: Some("eth0".into()),
            default_image: Some("pxe".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (c.dhcp, c.admission, c.http.port()),
            (DhcpMode::Proxy, Admission::Auto, 8080)
        );
        let e = ServeConfig::load(&Flags {
            dhcp: Some(DhcpMode::Full),
            interface: Some("eth0".into()),
            default_image: Some("p".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("full DHCP needs a range"),
            "{e:#}"
        );
    }

    #[test]
    fn the_cluster_section_is_read_and_checked() {
        let more = r#"
[cluster]
name = "edge"
control_planes = 3
api = "10.0.0.10"
data_disk = "/dev/vda"

[cluster.server]
write-kubeconfig-mode = "0644"
disable = ["traefik"]

[cluster.agent]
kubelet-arg = ["max-pods=50"]
"#;
        let c = load(&format!("{GOOD}{more}"), Flags::default()).unwrap();
        assert_eq!(c.cluster.name, "edge");
        assert_eq!(c.cluster.control_planes, 3);
        assert_eq!(
            c.cluster.api,
            ApiEndpoint::Fixed("https://10.0.0.10:6443".into())
        );
        assert_eq!(c.cluster.data_disk.as_deref(), Some("/dev/vda"));
        assert_eq!(c.cluster.server["disable"], serde_json::json!(["traefik"]));
        assert_eq!(
            c.cluster.agent["kubelet-arg"],
            serde_json::json!(["max-pods=50"])
        );
        // Defaults: one control plane, the API at the first one's address.
        let d = load(GOOD, Flags::default()).unwrap().cluster;
        assert_eq!(
            (d.control_planes, d.api),
            (1, ApiEndpoint::FirstControlPlane)
        );

        let bad = |text: &str| {
            format!(
                "{:#}",
                load(&format!("{GOOD}{text}"), Flags::default()).unwrap_err()
            )
        };
        let e = bad("[cluster]\ncontrol_planes = 2\n");
        assert!(
            e.contains("serve.toml:24:18: cluster.control_planes: 2 control planes: choose 1 or 3"),
            "{e}"
        );
        let e = bad("[cluster.server]\ntoken = \"mine\"\n");
        assert!(
            e.contains("cluster.server.token: is set by kiln for each node"),
            "{e}"
        );
        let e = bad("[cluster]\napi = \"http://10.0.0.1\"\n");
        assert!(
            e.contains("cluster.api: \"http://10.0.0.1\" is not an API address"),
            "{e}"
        );
        let e = bad("[cluster]\ndata_disk = \"/dev/vda; rm -rf /\"\n");
        assert!(e.contains("cluster.data_disk:"), "{e}");
        let e = bad("[[machine]]\nmac = \"52:54:00:00:00:02\"\nhostname = \"CP_2\"\n");
        assert!(
            e.contains("machine[1].hostname: \"CP_2\" is not a node name"),
            "{e}"
        );
        let e = bad("[[machine]]\nmac = \"52:54:00:00:00:02\"\nhostname = \"cp-1\"\n");
        assert!(
            e.contains("machine[1].hostname: cp-1 is listed twice"),
            "{e}"
        );
        let e = bad("[[machine]]\nmac = \"52:54:00:00:00:02\"\ntaints = [\"gpu\"]\n");
        assert!(
            e.contains("machine[1].taints: \"gpu\" is not a taint"),
            "{e}"
        );
        let e = bad("[[machine]]\nmac = \"52:54:00:00:00:02\"\nrole = \"server\"\n");
        assert!(
            e.contains("2 machines have role = \"server\", more than cluster.control_planes = 1"),
            "{e}"
        );
        assert_eq!(
            api_url("k8s.example:7443/").unwrap(),
            "https://k8s.example:7443"
        );
        assert_eq!(
            api_url("https://10.0.0.1").unwrap(),
            "https://10.0.0.1:6443"
        );
    }
}
