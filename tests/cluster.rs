//! End to end, power-on to cluster: three x86_64 QEMU nodes (SeaBIOS + iPXE
//! ROM, TCG) PXE-boot at once from one `kiln serve` in a network namespace
//! the test makes, under the allowlist policy with three control planes.
//! Their stand-in k3s must record one `cluster-init: true` and two servers
//! joining it with the same token. Then kiln serve is killed (-9) and
//! restarted and one joining server reboots: it keeps its name and role. A
//! fourth MAC, and requests without the machine's secret, get no token; the
//! token never shows in kiln serve's log (at debug level) or /api/machines.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const SUBNET: u8 = 71;

#[test]
fn three_nodes_boot_at_once_and_form_one_cluster() {
    let tag = "cluster";
    if !is_root() {
        skip(tag, "needs root (network namespace, tap devices)");
        return;
    }
    for prog in ["qemu-system-x86_64", "curl"] {
        if !have(prog) {
            skip(tag, &format!("{prog} not installed (bash .ci/setup)"));
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let images = image();
    // The namespace has no route out: iPXE comes from the (verified) cache.
    prefetch_ipxe();

    let ns = Netns::create(tag, SUBNET);
    let net = format!("10.77.{SUBNET}");
    let ip = ns.server_ip();
    let macs: Vec<String> = (1..=4)
        .map(|n| format!("52:54:00:{SUBNET:02x}:00:{n:02x}"))
        .collect();
    let config = tmp.path().join("serve.toml");
    let mut text = format!(
        "[dhcp]\nrouter = \"{ip}\"\ndns = [\"{ip}\"]\n\n\
         [admission]\npolicy = \"allowlist\"\n\n\
         [cluster]\nname = \"e2e\"\ncontrol_planes = 3\ndata_disk = \"/dev/vda\"\n\n\
         [cluster.server]\nwrite-kubeconfig-mode = \"0644\"\n\n\
         [image.pxe-x86_64]\nkernel_args = \"console=ttyS0 panic=-1\"\n"
    );
    // The first three are admitted; the fourth is not in the inventory.
    for mac in &macs[..3] {
        text.push_str(&format!("\n[[machine]]\nmac = \"{mac}\"\n"));
    }
    std::fs::write(&config, text).unwrap();
    let log_path = tmp.path().join("serve.log");
    let serve_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // What a failure shows of the (debug-level, long) log.
    let log_tail = || {
        let log = serve_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    let curl = |args: &[&str]| -> (String, String) {
        let o = ns.command("curl").args(["-s"]).args(args).output().unwrap();
        (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let http = format!("{ip}:8080");
    let state = tmp.path().join("state.db");
    let log = &log_path;
    let run = ServeRun {
        config: &config,
        images,
        default_image: "pxe-x86_64",
        dhcp: "full",
        net: &net,
        http: &http,
        state: &state,
        verbose: true,
        log,
    };
    // Returns once it answers HTTP (DHCP and TFTP are up by then).
    let start_serve = || start_kiln_serve(&ns, &run);
    let mut serve = start_serve();

    // Each node: a tap on the bridge, a blank 64 MiB disk for kiln-data.
    let node = |i: usize| {
        let disk = tmp.path().join(format!("disk{i}.raw"));
        if !disk.exists() {
            std::fs::File::create(&disk)
                .unwrap()
                .set_len(64 << 20)
                .unwrap();
        }
        let mut q = ns.command("qemu-system-x86_64");
        q.args(["-m", "768", "-nographic", "-no-reboot", "-accel", "tcg"])
            .args(["-boot", "n"])
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname=tap{i},script=no,downscript=no"),
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={}", macs[i]),
                "-drive",
                &format!("file={},if=virtio,format=raw", disk.display()),
            ]);
        Guest::start(q)
    };
    for i in 0..3 {
        ns.add_tap(&format!("tap{i}"));
    }
    let mut guests: Vec<Guest> = (0..3).map(node).collect();
    let records = |guests: &mut Vec<Guest>, timeout: Duration| -> Vec<String> {
        let start = Instant::now();
        loop {
            let done = guests
                .iter()
                .all(|g| g.console().contains("k3s-standin: config-end"));
            if done {
                break;
            }
            if start.elapsed() > timeout {
                let consoles: Vec<String> = guests.iter().map(|g| g.console()).collect();
                panic!(
                    "not every node started k3s within {timeout:?}:\n{}\nkiln serve log:\n{}",
                    consoles.join("\n=====\n"),
                    log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        guests
            .iter()
            .map(|g| {
                between(
                    &g.console(),
                    "k3s-standin: config-begin",
                    "k3s-standin: config-end",
                )
            })
            .collect()
    };
    // Three TCG guests share two cores.
    let configs = records(&mut guests, Duration::from_secs(900));
    let key = |cfg: &str, k: &str| -> Option<String> {
        cfg.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .map(|v| v.trim().trim_matches('"').to_string())
    };
    let token = key(&configs[0], "token").expect("a token");
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "{token}"
    );
    let inits: Vec<usize> = (0..3)
        .filter(|&i| key(&configs[i], "cluster-init").as_deref() == Some("true"))
        .collect();
    assert_eq!(inits.len(), 1, "one cluster-init: {configs:#?}");
    let first = inits[0];
    // Every node reports k3s-ready (the stand-in answers kubectl get node);
    // the machines API knows the first control plane's address.
    let start = Instant::now();
    let machines = loop {
        let (machines, _) = curl(&["-f", &format!("http://{ip}:8080/api/machines")]);
        if machines.matches("\"k3s-ready\"").count() >= 3 {
            break machines;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "not every node reported k3s-ready: {machines}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(!machines.contains(&token), "the token in /api/machines");
    let v: serde_json::Value =
        serde_json::from_str(&machines).unwrap_or_else(|e| panic!("{e}: {machines}"));
    let listed = |mac: &str| -> serde_json::Value {
        v.as_array()
            .unwrap()
            .iter()
            .find(|m| m["mac"] == mac)
            .unwrap_or_else(|| panic!("{mac} not listed: {machines}"))
            .clone()
    };
    let first_ip = listed(&macs[first])["address"]
        .as_str()
        .unwrap()
        .to_string();
    for (i, cfg) in configs.iter().enumerate() {
        assert_eq!(key(cfg, "token").as_deref(), Some(token.as_str()), "{cfg}");
        assert_eq!(
            key(cfg, "write-kubeconfig-mode").as_deref(),
            Some("0644"),
            "{cfg}"
        );
        if i != first {
            assert_eq!(
                key(cfg, "server"),
                Some(format!("https://{first_ip}:6443")),
                "{cfg}"
            );
            assert_eq!(key(cfg, "cluster-init"), None, "{cfg}");
        }
        let g = guests[i].console();
        assert!(g.contains("k3s-standin: args=server"), "{g}");
        // The baked platform manifests and air-gap images, on the node's
        // data partition (made on this first boot) where k3s looks for them.
        for line in [
            "k3s-standin: manifests=kiln-platform-argocd.yaml kiln-platform-vault.yaml \n",
            "k3s-standin: airgap=k3s-airgap-images-amd64.tar.zst \n",
            "k3s-standin: rancher-on=/dev/vda1\n",
        ] {
            assert!(g.contains(line), "no {line:?} in\n{g}");
        }
        let m = listed(&macs[i]);
        assert_eq!(m["role"], "server", "{machines}");
        let hostname = m["hostname"].as_str().unwrap();
        assert!(hostname.starts_with("e2e-server-"), "{machines}");
        assert!(
            g.contains(&format!("k3s-standin: hostname={hostname}")),
            "{g}"
        );
    }

    // Nothing for a MAC outside the allowlist, nor without the secret.
    let node_config = format!("http://{ip}:8080/api/v1/node-config");
    let secret = "0123456789abcdef".repeat(4);
    for (body, why) in [
        (
            format!("mac={}&secret={secret}", macs[3]),
            "not in the inventory",
        ),
        (format!("mac={}", macs[1]), "no machine secret"),
        (
            format!("mac={}&secret={secret}", macs[1]),
            "the secret differs",
        ),
    ] {
        let (out, _) = curl(&["-w", "\n%{http_code}", "--data", &body, &node_config]);
        assert!(out.ends_with("\n403") && out.contains(why), "{body}: {out}");
        assert!(!out.contains(&token), "{body}: {out}");
    }
    let (out, _) = curl(&[
        "-w",
        "\n%{http_code}",
        &format!("http://{ip}:8080/boot.ipxe?mac={}", macs[3]),
    ]);
    assert!(out.ends_with("\n403") && !out.contains(&token), "{out}");
    let log = serve_log();
    assert!(
        log.contains("node config refused") && log.contains(&macs[3]),
        "refusals are logged:\n{}",
        log_tail()
    );

    // kill -9 and restart the server, then reboot a joining server: the same
    // name, role, server and token.
    drop(serve);
    serve = start_serve();
    let again = (0..3).find(|&i| i != first).unwrap();
    let before = guests[again].console();
    drop(std::mem::replace(&mut guests[again], node(again)));
    let mut one = vec![guests.remove(again)];
    let cfg = records(&mut one, Duration::from_secs(600)).remove(0);
    assert_eq!(cfg, configs[again], "the rebooted node's config changed");
    let hostname_line = |c: &str| {
        c.lines()
            .find(|l| l.starts_with("k3s-standin: hostname="))
            .map(str::to_string)
    };
    assert_eq!(hostname_line(&one[0].console()), hostname_line(&before));
    assert!(
        !one[0].console().contains("stage=config-cached"),
        "the rebooted node should get its config from the server (its secret is on its data disk):\n{}\n{}",
        one[0].console(),
        log_tail()
    );
    drop(one);
    drop(guests);
    drop(serve);

    let log = serve_log();
    assert!(log.contains("served the node config"), "{}", log_tail());
    assert!(!log.contains(&token), "the token is in kiln serve's log");
    // The only refusals were this test's own requests (from the server's
    // address), none of a node's.
    let from_nodes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("node config refused") && !l.contains(&format!("peer={ip}:")))
        .collect();
    assert!(from_nodes.is_empty(), "{from_nodes:#?}");
}

/// Builds images/pxe-x86_64.toml once for this file.
fn image() -> &'static Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cluster-e2e");
        let www = dir.join("www");
        let _ = std::fs::remove_dir_all(&dir);
        let releases = release_server(&www);
        // The example spec with two platform charts and the release's
        // air-gap images: control planes start with them.
        let spec = std::fs::read_to_string(repo().join("images/pxe-x86_64.toml"))
            .unwrap()
            .replacen(
                "outputs = [\"pxe\"]\n",
                "outputs = [\"pxe\"]\nplatform = [\"argocd\", \"vault\"]\n",
                1,
            )
            .replacen(
                "[k3s]\n",
                "[k3s]\nairgap_images = [\"k3s-airgap-images-amd64.tar.zst\"]\n",
                1,
            );
        assert!(spec.contains("platform =") && spec.contains("airgap_images ="));
        let path = dir.join("pxe-x86_64.toml");
        std::fs::write(&path, spec).unwrap();
        build_spec(
            path.to_str().unwrap(),
            "pxe-x86_64",
            &dir.join("images"),
            &releases,
            &[],
        );
        dir.join("images")
    })
}
