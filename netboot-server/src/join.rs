//! Joining the cluster: the role and name a machine gets, and the node config
//! it is served (DESIGN.md, "Join").
//!
//! Pure decisions: `assign` takes the cluster settings, the inventory and the
//! members recorded so far and says what a machine is; the state store calls
//! it inside the transaction that records the answer, so two machines asking
//! at once cannot both start the cluster.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use serde_json::Value;

use crate::config::{ApiEndpoint, Cluster, Machine, Role};

/// The cluster's join token. Its `Debug` and `Display` never show it, so it
/// cannot reach a log by accident; [`Token::expose`] is the one way to it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A new token: 32 bytes from the operating system's CSPRNG, as hex.
    pub fn generate() -> anyhow::Result<Token> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| anyhow::anyhow!("the system's random source failed: {e}"))?;
        Ok(Token(hex(&bytes)))
    }

    /// A token read back from the state store.
    pub fn from_stored(s: String) -> Token {
        Token(s)
    }

    /// The token itself, for the node config and the state store only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A machine that has joined: what it is, kept across its reboots and the
/// server's restarts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Lower-case, colon-separated.
    pub mac: String,
    pub hostname: String,
    pub role: Role,
    /// The first control plane: it starts the cluster (`cluster-init: true`).
    pub init: bool,
    /// The role came from the inventory (it holds one of the inventory's
    /// server slots, if a server).
    pub fixed: bool,
    /// The address its last node-config request came from.
    pub address: Option<Ipv4Addr>,
}

/// What a machine is, given the members so far. A member keeps its name and
/// role; the inventory's hostname and role win over assigned ones. A new
/// machine without a fixed role is a server while the control planes are not
/// all taken (counting the inventory's servers that have not joined yet),
/// else an agent; the first server starts the cluster.
pub fn assign(
    cluster: &Cluster,
    inventory: &[Machine],
    members: &[Member],
    mac: &str,
    entry: Option<&Machine>,
) -> Member {
    let fixed_role = entry.and_then(|e| e.role);
    let fixed_name = entry.and_then(|e| e.hostname.clone());
    let init_taken = |except: &str| members.iter().any(|m| m.init && m.mac != except);
    if let Some(known) = members.iter().find(|m| m.mac == mac) {
        let mut m = known.clone();
        if let Some(h) = fixed_name {
            m.hostname = h;
        }
        if let Some(r) = fixed_role {
            m.fixed = true;
            if r != m.role {
                m.role = r;
                m.init = r == Role::Server && !init_taken(mac);
            }
        }
        return m;
    }
    let role = fixed_role.unwrap_or_else(|| {
        let servers = members.iter().filter(|m| m.role == Role::Server).count();
        let inventory_servers = inventory
            .iter()
            .filter(|m| m.role == Some(Role::Server))
            .count();
        let joined_fixed_servers = members
            .iter()
            .filter(|m| m.fixed && m.role == Role::Server)
            .count();
        let reserved = inventory_servers.saturating_sub(joined_fixed_servers);
        if servers + reserved < usize::from(cluster.control_planes) {
            Role::Server
        } else {
            Role::Agent
        }
    });
    let hostname = fixed_name.unwrap_or_else(|| {
        (1..)
            .map(|n| format!("{}-{}-{n}", cluster.name, role.as_str()))
            .find(|name| {
                !members.iter().any(|m| &m.hostname == name)
                    && !inventory
                        .iter()
                        .any(|m| m.hostname.as_deref() == Some(name.as_str()))
            })
            .expect("an unused name")
    });
    Member {
        mac: mac.to_string(),
        hostname,
        role,
        init: role == Role::Server && !init_taken(mac),
        fixed: fixed_role.is_some(),
        address: None,
    }
}

/// The config a node boots with: its name, role, data disk and the k3s
/// settings that become /etc/rancher/k3s/config.yaml.
#[derive(Clone, PartialEq)]
pub struct NodeConfig {
    pub hostname: String,
    pub role: Role,
    pub data_disk: Option<String>,
    /// config.yaml keys; holds the token.
    pub k3s: BTreeMap<String, Value>,
}

impl fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeConfig")
            .field("hostname", &self.hostname)
            .field("role", &self.role)
            .field("data_disk", &self.data_disk)
            .field("k3s", &self.k3s.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Why a node config cannot be given yet.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotYet {
    #[error("the first control plane has not asked for its config yet, so the API address is not known; retry")]
    NoApiAddress,
}

/// The API URL nodes join: the fixed one, else the first control plane's.
pub fn api_server(cluster: &Cluster, members: &[Member]) -> Option<String> {
    match &cluster.api {
        ApiEndpoint::Fixed(url) => Some(url.clone()),
        ApiEndpoint::FirstControlPlane => members
            .iter()
            .find(|m| m.init)
            .and_then(|m| m.address)
            .map(|a| format!("https://{a}:6443")),
    }
}

/// The node config of a member: the cluster's settings for its role, then
/// what kiln sets (token, `cluster-init` or `server`, labels, taints).
pub fn node_config(
    cluster: &Cluster,
    member: &Member,
    entry: Option<&Machine>,
    members: &[Member],
    token: &Token,
) -> Result<NodeConfig, NotYet> {
    let mut k3s = match member.role {
        Role::Server => cluster.server.clone(),
        Role::Agent => cluster.agent.clone(),
    };
    k3s.insert("token".into(), token.expose().into());
    if member.init {
        k3s.insert("cluster-init".into(), true.into());
    } else {
        let api = api_server(cluster, members).ok_or(NotYet::NoApiAddress)?;
        k3s.insert("server".into(), api.into());
    }
    if let Some(e) = entry {
        if !e.labels.is_empty() {
            let labels: Vec<Value> = e
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}").into())
                .collect();
            k3s.insert("node-label".into(), labels.into());
        }
        if !e.taints.is_empty() {
            k3s.insert("node-taint".into(), e.taints.clone().into());
        }
    }
    Ok(NodeConfig {
        hostname: member.hostname.clone(),
        role: member.role,
        data_disk: entry
            .and_then(|e| e.data_disk.clone())
            .or_else(|| cluster.data_disk.clone()),
        k3s,
    })
}

impl NodeConfig {
    /// The YAML the node reads (README, "The node config"): top-level
    /// scalars, then the `k3s:` map. Values are written as JSON, which is
    /// YAML (flow style), so every string is quoted and escaped.
    pub fn to_yaml(&self) -> String {
        let q = |s: &str| Value::from(s).to_string();
        let mut out = format!(
            "# kiln node config\nhostname: {}\nrole: {}\n",
            q(&self.hostname),
            q(self.role.as_str())
        );
        if let Some(d) = &self.data_disk {
            out.push_str(&format!("data_disk: {}\n", q(d)));
        }
        out.push_str("k3s:\n");
        for (k, v) in &self.k3s {
            out.push_str(&format!("  {k}: {v}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(control_planes: u8) -> Cluster {
        Cluster {
            control_planes,
            ..Cluster::default()
        }
    }

    fn mac(n: u8) -> String {
        format!("52:54:00:00:00:{n:02x}")
    }

    /// Machines asking in order, each recorded as the store would; returns
    /// (hostname, role, init) per machine.
    fn join_in_order(
        c: &Cluster,
        inventory: &[Machine],
        macs: &[String],
        members: &mut Vec<Member>,
    ) -> Vec<(String, Role, bool)> {
        macs.iter()
            .map(|m| {
                let entry = crate::config::find_machine(inventory, m, None, None);
                let got = assign(c, inventory, members, m, entry);
                members.retain(|x| &x.mac != m);
                members.push(got.clone());
                (got.hostname, got.role, got.init)
            })
            .collect()
    }

    #[test]
    fn the_first_server_starts_the_cluster_the_next_join_and_the_rest_are_agents() {
        let c = cluster(3);
        let macs: Vec<String> = (1..=5).map(mac).collect();
        let mut members = Vec::new();
        let got = join_in_order(&c, &[], &macs, &mut members);
        assert_eq!(
            got,
            [
                ("kiln-server-1".into(), Role::Server, true),
                ("kiln-server-2".into(), Role::Server, false),
                ("kiln-server-3".into(), Role::Server, false),
                ("kiln-agent-1".into(), Role::Agent, false),
                ("kiln-agent-2".into(), Role::Agent, false),
            ]
        );
        // One control plane: one server, then agents.
        let mut members = Vec::new();
        let got = join_in_order(&cluster(1), &[], &macs[..2], &mut members);
        assert_eq!(
            got.iter().map(|g| (g.1, g.2)).collect::<Vec<_>>(),
            [(Role::Server, true), (Role::Agent, false)]
        );
    }

    #[test]
    fn rebooting_machines_and_a_restarted_server_keep_names_and_roles() {
        let c = cluster(3);
        let macs: Vec<String> = (1..=4).map(mac).collect();
        let mut members = Vec::new();
        let first = join_in_order(&c, &[], &macs, &mut members);
        // The members are what the store keeps: a restarted server reads
        // them back; machines reboot in another order.
        let mut reloaded = members.clone();
        let rev: Vec<String> = macs.iter().rev().cloned().collect();
        let mut again = join_in_order(&c, &[], &rev, &mut reloaded);
        again.reverse();
        assert_eq!(first, again);
        assert_eq!(reloaded.iter().filter(|m| m.init).count(), 1);
    }

    #[test]
    fn inventory_roles_and_names_win_and_hold_their_server_slots() {
        let c = cluster(3);
        let inventory = vec![
            Machine {
                mac: Some(mac(9)),
                role: Some(Role::Server),
                hostname: Some("cp-a".into()),
                ..Machine::default()
            },
            Machine {
                mac: Some(mac(8)),
                role: Some(Role::Agent),
                ..Machine::default()
            },
            Machine {
                mac: Some(mac(7)),
                hostname: Some("kiln-server-1".into()),
                ..Machine::default()
            },
        ];
        let mut members = Vec::new();
        // Two unknown machines ask first: with one slot held for cp-a, only
        // two of three slots are free; a fixed agent stays an agent.
        let got = join_in_order(
            &c,
            &inventory,
            &[mac(1), mac(8), mac(2), mac(3), mac(9)],
            &mut members,
        );
        assert_eq!(
            got,
            [
                // kiln-server-1 is the inventory's name of another machine.
                ("kiln-server-2".into(), Role::Server, true),
                ("kiln-agent-1".into(), Role::Agent, false),
                ("kiln-server-3".into(), Role::Server, false),
                ("kiln-agent-2".into(), Role::Agent, false),
                ("cp-a".into(), Role::Server, false),
            ]
        );
        // An inventory entry changed later: its name and role win at the
        // machine's next request.
        let changed = vec![Machine {
            mac: Some(mac(3)),
            role: Some(Role::Server),
            hostname: Some("big-one".into()),
            ..Machine::default()
        }];
        let m = assign(&c, &changed, &members, &mac(3), changed.first());
        assert_eq!(
            (m.hostname.as_str(), m.role, m.init, m.fixed),
            ("big-one", Role::Server, false, true)
        );
    }

    #[test]
    fn the_node_config_carries_token_role_server_labels_and_taints() {
        let mut c = cluster(3);
        c.server
            .insert("write-kubeconfig-mode".into(), "0644".into());
        c.agent
            .insert("kubelet-arg".into(), vec!["max-pods=50"].into());
        let token = Token::generate().unwrap();
        assert_eq!(token.expose().len(), 64);
        assert_ne!(token, Token::generate().unwrap());
        assert_eq!(format!("{token:?} {token}"), "Token(<redacted>) <redacted>");
        let entry = Machine {
            mac: Some(mac(2)),
            labels: [("zone".to_string(), "a".to_string())].into(),
            taints: vec!["dedicated=gpu:NoSchedule".into()],
            data_disk: Some("/dev/nvme0n1".into()),
            ..Machine::default()
        };
        let mut members = Vec::new();
        join_in_order(&c, &[], &[mac(1), mac(2)], &mut members);
        // The second server cannot join before the first one's address is known.
        assert_eq!(
            node_config(&c, &members[1], Some(&entry), &members, &token),
            Err(NotYet::NoApiAddress)
        );
        members[0].address = Some(Ipv4Addr::new(10, 0, 0, 5));
        let init = node_config(&c, &members[0], None, &members, &token).unwrap();
        assert_eq!(init.k3s["cluster-init"], true);
        assert!(!init.k3s.contains_key("server"));
        let join = node_config(&c, &members[1], Some(&entry), &members, &token).unwrap();
        let yaml = join.to_yaml();
        assert_eq!(
            yaml,
            format!(
                "# kiln node config\nhostname: \"kiln-server-2\"\nrole: \"server\"\ndata_disk: \"/dev/nvme0n1\"\nk3s:\n  node-label: [\"zone=a\"]\n  node-taint: [\"dedicated=gpu:NoSchedule\"]\n  server: \"https://10.0.0.5:6443\"\n  token: \"{}\"\n  write-kubeconfig-mode: \"0644\"\n",
                token.expose()
            )
        );
        assert!(!format!("{join:?}").contains(token.expose()));
        // A fixed API address wins.
        c.api = ApiEndpoint::Fixed("https://10.0.0.100:6443".into());
        members[0].address = None;
        let agent = Member {
            role: Role::Agent,
            ..members[1].clone()
        };
        let cfg = node_config(&c, &agent, None, &members, &token).unwrap();
        assert_eq!(cfg.k3s["server"], "https://10.0.0.100:6443");
        assert_eq!(cfg.k3s["kubelet-arg"], serde_json::json!(["max-pods=50"]));
        assert!(!cfg.k3s.contains_key("write-kubeconfig-mode"));
    }
}
