//! The HTTP side of `kiln serve` (axum): per-machine iPXE scripts, image
//! artifacts (Content-Length, Range, ETag), boot-stage reports from nodes and
//! the machines API.
//!
//! Images are directories `<images>/<name>/` made by `kiln build`; only the
//! artifacts their manifest.json lists are served, with the manifest's sha256
//! as a strong ETag. Manifests are read per request, so a rebuilt image is
//! served without a restart.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Path, Query, Request, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use kiln_builder::manifest::{LoadError, Manifest};
use serde::Deserialize;

use crate::artifacts::{choose_range, ArtifactCache, Slice};
use crate::join::{self, Token};
use crate::metrics::Metrics;
use crate::state::{normalize_mac, JoinOutcome, State};
use crate::{unix_now, unix_now_ms};

/// What the HTTP handlers share.
pub struct HttpContext {
    /// Directory holding one subdirectory per image.
    pub images: PathBuf,
    /// The base URL nodes use to reach this server, e.g. `http://10.0.0.1:8080`.
    pub public_url: String,
    /// The image a machine gets unless the inventory says otherwise.
    pub default_image: String,
    /// The inventory (machines by MAC, serial or UUID).
    pub machines: Vec<crate::config::Machine>,
    /// Under `allowlist`, machines outside the inventory get no boot script.
    pub admission: crate::config::Admission,
    /// Extra kernel arguments per image name (e.g. `console=ttyS0`).
    pub kernel_args: BTreeMap<String, String>,
    pub state: Arc<State>,
    pub metrics: Arc<Metrics>,
    /// iPXE binaries by file name, for UEFI HTTP boot (`/ipxe/<file>`).
    pub ipxe: BTreeMap<String, bytes::Bytes>,
    /// Artifacts mapped and checked against their manifests.
    pub artifacts: Arc<ArtifactCache>,
    /// The cluster nodes join, and its token (from the state store).
    pub cluster: crate::config::Cluster,
    pub token: Token,
}

/// The router of the HTTP server.
pub fn router(ctx: Arc<HttpContext>) -> Router {
    Router::new()
        .route("/boot.ipxe", get(boot_script))
        .route("/images/{image}/{file}", get(artifact))
        .route("/ipxe/{file}", get(ipxe_binary))
        .route("/api/v1/stages", post(stage))
        .route("/api/v1/node-config", post(node_config))
        .route("/api/machines", get(machines))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), count))
        .with_state(ctx)
}

/// Counts every response by route and status, and the bytes sent.
async fn count(AxState(ctx): AxState<Arc<HttpContext>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let resp = next.run(req).await;
    let bytes = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ctx.metrics
        .http
        .count_response(&route, resp.status().as_u16(), bytes);
    resp
}

/// The counters, for Prometheus.
async fn metrics(AxState(ctx): AxState<Arc<HttpContext>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ctx.metrics.render(),
    )
        .into_response()
}

/// An error answer: a status and a one-line reason (logged too).
struct HttpError(StatusCode, String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        tracing::info!(status = self.0.as_u16(), "{}", self.1);
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

impl From<anyhow::Error> for HttpError {
    fn from(e: anyhow::Error) -> Self {
        HttpError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

fn valid_image_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn load_manifest(ctx: &HttpContext, image: &str) -> Result<Manifest, HttpError> {
    if !valid_image_name(image) {
        return Err(HttpError(
            StatusCode::BAD_REQUEST,
            format!("{image:?} is not an image name"),
        ));
    }
    Manifest::load(&ctx.images.join(image)).map_err(|e| match e {
        LoadError::Missing(_) => {
            HttpError(StatusCode::NOT_FOUND, format!("no image {image} ({e})"))
        }
        e => HttpError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    })
}

#[derive(Deserialize)]
struct ScriptQuery {
    mac: String,
}

/// The iPXE script that boots a machine into its image.
async fn boot_script(
    AxState(ctx): AxState<Arc<HttpContext>>,
    Query(q): Query<ScriptQuery>,
) -> Result<Response, HttpError> {
    let mac =
        normalize_mac(&q.mac).map_err(|e| HttpError(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let entry = inventory_entry(&ctx.state, &ctx.machines, Some(&mac), None)?;
    if !ctx.admission.admits(entry) {
        return Err(HttpError(
            StatusCode::FORBIDDEN,
            format!("{mac} is not in the inventory (admission policy allowlist)"),
        ));
    }
    let image = entry
        .and_then(|m| m.image.clone())
        .unwrap_or_else(|| ctx.default_image.clone());
    let manifest = load_manifest(&ctx, &image)?;
    let script = render_script(&ctx, &mac, &image, &manifest)?;
    let role = entry.and_then(|m| m.role).map(|r| r.as_str());
    let hostname = entry.and_then(|m| m.hostname.as_deref());
    ctx.state
        .touch_machine(&mac, None, Some(&image), role, hostname, unix_now())?;
    ctx.state.mark_netboot(&mac)?;
    tracing::info!(%mac, %image, "served the iPXE script");
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        script,
    )
        .into_response())
}

/// A machine's inventory entry, found by its MAC, or by a serial the caller
/// knows (a Raspberry Pi's TFTP prefix), or by the serial or UUID its DHCP
/// requests carried (recorded in the state store).
pub fn inventory_entry<'a>(
    state: &State,
    machines: &'a [crate::config::Machine],
    mac: Option<&str>,
    serial: Option<&str>,
) -> Result<Option<&'a crate::config::Machine>> {
    let (seen_serial, uuid) = match mac {
        Some(mac) => state.identity(mac)?,
        None => (None, None),
    };
    Ok(crate::config::find_machine(
        machines,
        mac.unwrap_or(""),
        serial.or(seen_serial.as_deref()),
        uuid.as_deref(),
    ))
}

fn render_script(
    ctx: &HttpContext,
    mac: &str,
    image: &str,
    m: &Manifest,
) -> Result<String, HttpError> {
    let kiln_args = kiln_args(&ctx.public_url, image, m, ctx.kernel_args.get(image))
        .map_err(|e| HttpError(StatusCode::NOT_FOUND, e))?;
    let base = ctx.public_url.trim_end_matches('/');
    let kernel = &m.kernel.version;
    // `initrd=` names the initrd for EFI kernels, which load it themselves
    // through the EFI stub.
    Ok(format!(
        "#!ipxe\n\
         # kiln: {mac} boots {image} ({kernel})\n\
         kernel {base}/images/{image}/vmlinuz initrd=initrd.img {kiln_args}\n\
         initrd --name initrd.img {base}/images/{image}/initrd.img\n\
         boot\n"
    ))
}

/// The kernel arguments that boot `image` from this server: where the root
/// is, its sha256, where to report, then the image's extra arguments. The
/// error says why the image cannot be booted over the network.
pub fn kiln_args(
    public_url: &str,
    image: &str,
    m: &Manifest,
    extra: Option<&String>,
) -> Result<String, String> {
    let root = m.artifact("rootfs.squashfs").ok_or_else(|| {
        format!("image {image} has no rootfs.squashfs (is it a network-boot image?)")
    })?;
    let base = public_url.trim_end_matches('/');
    let mut args = format!(
        "kiln.root={base}/images/{image}/rootfs.squashfs kiln.root_sha256={} kiln.server={base}",
        root.sha256
    );
    if let Some(extra) = extra.filter(|e| !e.is_empty()) {
        args.push(' ');
        args.push_str(extra);
    }
    Ok(args)
}

/// An artifact of an image, with Range support and the manifest's sha256 as ETag.
async fn artifact(
    AxState(ctx): AxState<Arc<HttpContext>>,
    Path((image, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let manifest = load_manifest(&ctx, &image)?;
    let Some(a) = manifest.artifact(&file).cloned() else {
        return Err(HttpError(
            StatusCode::NOT_FOUND,
            format!("image {image} has no artifact {file:?}"),
        ));
    };
    let etag = format!("\"{}\"", a.sha256);
    let header_str = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if header_str(header::IF_NONE_MATCH).is_some_and(|v| v.split(',').any(|t| t.trim() == etag)) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let slice = choose_range(
        header_str(header::RANGE),
        header_str(header::IF_RANGE),
        &etag,
        a.size,
    );
    // A range outside the artifact is answered from the manifest's size,
    // before the artifact is mapped.
    let part = match slice {
        Slice::Unsatisfiable => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [
                    (header::CONTENT_RANGE, format!("bytes */{}", a.size)),
                    (header::ETAG, etag),
                ],
            )
                .into_response())
        }
        Slice::Full => None,
        Slice::Part(r) => Some(r),
    };
    let path = ctx.images.join(&image).join(&a.name);
    let cache = ctx.artifacts.clone();
    let bytes = tokio::task::spawn_blocking(move || cache.get(&path, &a.sha256, a.size))
        .await
        .map_err(|e| anyhow::anyhow!("mapping {image}/{file}: {e}"))?
        .map_err(|e| HttpError(StatusCode::SERVICE_UNAVAILABLE, e))?;
    let (status, body, content_range) = match part {
        None => (StatusCode::OK, bytes, None),
        Some(r) => {
            let range = format!("bytes {}-{}/{}", r.start(), r.end(), bytes.len());
            let part = bytes.slice(*r.start() as usize..=*r.end() as usize);
            (StatusCode::PARTIAL_CONTENT, part, Some(range))
        }
    };
    let mut resp = Response::builder()
        .status(status)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::ETAG, &etag)
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if let Some(r) = content_range {
        resp = resp.header(header::CONTENT_RANGE, r);
    }
    resp.body(Body::from(body))
        .map_err(|e| HttpError::from(anyhow::Error::from(e)))
}

/// An iPXE binary (UEFI HTTP boot fetches it before iPXE runs).
async fn ipxe_binary(
    AxState(ctx): AxState<Arc<HttpContext>>,
    Path(file): Path<String>,
) -> Result<Response, HttpError> {
    let bytes = ctx
        .ipxe
        .get(&file)
        .ok_or_else(|| HttpError(StatusCode::NOT_FOUND, format!("no iPXE binary {file:?}")))?;
    Ok(([(header::CONTENT_TYPE, "application/efi")], bytes.clone()).into_response())
}

#[derive(Deserialize)]
struct StageReport {
    mac: String,
    stage: String,
}

/// A boot stage a node reports (`kiln.server`): `mac=<MAC>&stage=<name>`.
async fn stage(
    AxState(ctx): AxState<Arc<HttpContext>>,
    Form(r): Form<StageReport>,
) -> Result<StatusCode, HttpError> {
    let mac =
        normalize_mac(&r.mac).map_err(|e| HttpError(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let ok = !r.stage.is_empty()
        && r.stage.len() <= 40
        && r.stage
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        return Err(HttpError(
            StatusCode::BAD_REQUEST,
            format!("{:?} is not a stage name", r.stage),
        ));
    }
    ctx.state.record_stage(&mac, &r.stage, unix_now_ms())?;
    ctx.metrics.http.count_stage(&r.stage);
    tracing::info!(%mac, stage = %r.stage, "boot stage");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct NodeConfigRequest {
    mac: String,
    /// The machine's secret, made at its first boot: 64 hex digits.
    #[serde(default)]
    secret: String,
    /// `0`: the node keeps no secret across reboots (no data partition).
    #[serde(default)]
    persistent: Option<String>,
}

fn valid_secret(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A node's config (`kiln.server`): `mac=<MAC>&secret=<hex>`, POSTed. The
/// machine must be admitted and send the secret it sent the first time
/// (trust on first use); it is given its role and name (kept across its
/// reboots and the server's restarts) and the cluster token. Refusals are
/// logged; nothing here logs the token.
async fn node_config(
    AxState(ctx): AxState<Arc<HttpContext>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(r): Form<NodeConfigRequest>,
) -> Result<Response, HttpError> {
    let mac =
        normalize_mac(&r.mac).map_err(|e| HttpError(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let entry = inventory_entry(&ctx.state, &ctx.machines, Some(&mac), None)?;
    // Logged here, with the peer, at warn: not through HttpError.
    let refuse = |why: String| {
        tracing::warn!(%mac, %peer, "node config refused: {why}");
        (
            StatusCode::FORBIDDEN,
            format!("node config refused: {why}\n"),
        )
            .into_response()
    };
    if !ctx.admission.admits(entry) {
        return Ok(refuse(format!(
            "{mac} is not in the inventory (admission policy allowlist)"
        )));
    }
    if !valid_secret(&r.secret) {
        return Ok(refuse(format!(
            "the request for {mac} has no machine secret (secret=<64 hex digits>)"
        )));
    }
    let secret_sha256 = kiln_builder::sha256_hex(r.secret.to_ascii_lowercase().as_bytes());
    let address = match peer.ip() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    let outcome = ctx.state.join(
        &mac,
        &secret_sha256,
        r.persistent.as_deref() != Some("0"),
        address,
        unix_now(),
        |members| join::assign(&ctx.cluster, &ctx.machines, members, &mac, entry),
    )?;
    let (member, members) = match outcome {
        JoinOutcome::WrongSecret => {
            return Ok(refuse(format!(
                "the secret differs from the one {mac} sent first (trust on first use; `kiln forget-secret {mac}` lets it enrol again)"
            )))
        }
        JoinOutcome::Member {
            member,
            members,
            reenrolled,
        } => {
            if reenrolled {
                tracing::warn!(
                    %mac, %peer,
                    "a diskless member network-booted and sent a new secret: taken in place of its old one"
                );
            }
            (member, members)
        }
    };
    let config = join::node_config(&ctx.cluster, &member, entry, &members, &ctx.token)
        .map_err(|e| HttpError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    tracing::info!(
        %mac, %peer, hostname = %member.hostname, role = member.role.as_str(), cluster_init = member.init,
        "served the node config"
    );
    Ok((
        [(header::CONTENT_TYPE, "application/yaml")],
        config.to_yaml(),
    )
        .into_response())
}

/// Every machine with its address, image, role and stages.
async fn machines(AxState(ctx): AxState<Arc<HttpContext>>) -> Result<Response, HttpError> {
    Ok(Json(ctx.state.machines()?).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request as HttpRequest;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn machine() -> crate::config::Machine {
        crate::config::Machine {
            image: Some("other".into()),
            ..Default::default()
        }
    }

    fn context(dir: &std::path::Path) -> Arc<HttpContext> {
        let img = dir.join("pxe");
        std::fs::create_dir_all(&img).unwrap();
        let root = b"squashfs bytes, not really".to_vec();
        std::fs::write(img.join("rootfs.squashfs"), &root).unwrap();
        std::fs::write(img.join("secret.txt"), b"not an artifact").unwrap();
        let m = serde_json::json!({
            "name": "pxe", "arch": "x86_64", "kiln_version": "0", "spec_sha256": "00", "source_date_epoch": 0,
            "kernel": {"package": "linux-image-x", "version": "6.12.0-test"}, "k3s": null,
            "artifacts": [
                {"name": "rootfs.squashfs", "sha256": kiln_builder::sha256_hex(&root), "size": root.len()},
                {"name": "initrd.img", "sha256": kiln_builder::sha256_hex(b"original"), "size": 8},
            ],
            "packages": []
        });
        std::fs::write(img.join("manifest.json"), m.to_string()).unwrap();
        Arc::new(HttpContext {
            images: dir.to_path_buf(),
            public_url: "http://10.0.0.1:8080/".into(),
            default_image: "pxe".into(),
            machines: vec![
                crate::config::Machine {
                    mac: Some("52:54:00:00:00:0e".into()),
                    ..machine()
                },
                crate::config::Machine {
                    uuid: Some("00112233-4455-6677-8899-aabbccddeeff".into()),
                    image: Some("by-uuid".into()),
                    ..machine()
                },
                crate::config::Machine {
                    mac: Some("52:54:00:00:00:10".into()),
                    image: Some("pxe".into()),
                    hostname: Some("cp-1".into()),
                    role: Some(crate::config::Role::Server),
                    ..machine()
                },
            ],
            kernel_args: [("pxe".to_string(), "console=ttyS0".to_string())].into(),
            state: Arc::new(State::in_memory().unwrap()),
            metrics: Arc::new(Metrics::default()),
            admission: crate::config::Admission::Auto,
            ipxe: [(
                "snponly.efi".to_string(),
                bytes::Bytes::from_static(b"MZ efi"),
            )]
            .into(),
            artifacts: Default::default(),
            cluster: crate::config::Cluster {
                control_planes: 3,
                ..Default::default()
            },
            token: State::in_memory().unwrap().cluster_token().unwrap(),
        })
    }

    async fn call(
        ctx: &Arc<HttpContext>,
        req: HttpRequest<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let peer: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let resp = router(ctx.clone())
            .layer(axum::extract::connect_info::MockConnectInfo(peer))
            .oneshot(req)
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes().to_vec(),
        )
    }

    fn get(uri: &str) -> HttpRequest<Body> {
        HttpRequest::get(uri).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn the_script_names_kernel_initrd_root_hash_and_args() {
        let d = tempfile::tempdir().unwrap();
        let ctx = context(d.path());
        let (status, _, body) = call(&ctx, get("/boot.ipxe?mac=52-54-00-AA-BB-CC")).await;
        let text = String::from_utf8(body).unwrap();
        assert_eq!(status, StatusCode::OK, "{text}");
        let sha = kiln_builder::sha256_hex(b"squashfs bytes, not really");
        assert!(text.starts_with("#!ipxe\n"), "{text}");
        assert!(
            text.contains("kernel http://10.0.0.1:8080/images/pxe/vmlinuz initrd=initrd.img "),
            "{text}"
        );
        assert!(text.contains(&format!("kiln.root_sha256={sha} ")), "{text}");
        assert!(
            text.contains("kiln.server=http://10.0.0.1:8080 console=ttyS0\n"),
            "{text}"
        );
        assert!(
            text.contains("initrd --name initrd.img http://10.0.0.1:8080/images/pxe/initrd.img\n"),
            "{text}"
        );
        let m = ctx.state.machines().unwrap();
        assert_eq!(
            (m[0].mac.as_str(), m[0].image.as_deref()),
            ("52:54:00:aa:bb:cc", Some("pxe"))
        );
        let (status, _, _) = call(&ctx, get("/boot.ipxe?mac=nonsense")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        // The inventory's image wins over the default (here: one not built).
        let (status, _, body) = call(&ctx, get("/boot.ipxe?mac=52:54:00:00:00:0E")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(String::from_utf8_lossy(&body).contains("no image other"));
        // A machine the inventory names by UUID, known by the UUID its DHCP
        // request carried.
        ctx.state
            .record_identity(
                "52:54:00:00:00:0f",
                "pxe-uefi-x64",
                None,
                Some("00112233-4455-6677-8899-aabbccddeeff"),
                1,
            )
            .unwrap();
        let (status, _, body) = call(&ctx, get("/boot.ipxe?mac=52:54:00:00:00:0f")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(String::from_utf8_lossy(&body).contains("no image by-uuid"));
        // The inventory's hostname and role show in /api/machines.
        let (status, _, _) = call(&ctx, get("/boot.ipxe?mac=52:54:00:00:00:10")).await;
        assert_eq!(status, StatusCode::OK);
        let (_, _, body) = call(&ctx, get("/api/machines")).await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let m = v
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mac"] == "52:54:00:00:00:10")
            .unwrap();
        assert_eq!(
            (m["hostname"].as_str(), m["role"].as_str()),
            (Some("cp-1"), Some("server"))
        );
    }

    #[tokio::test]
    async fn artifacts_have_length_range_and_etag_and_nothing_else_is_served() {
        let d = tempfile::tempdir().unwrap();
        let ctx = context(d.path());
        let (status, h, body) = call(&ctx, get("/images/pxe/rootfs.squashfs")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, b"squashfs bytes, not really");
        assert_eq!(h[header::CONTENT_LENGTH], "26");
        let etag = h[header::ETAG].to_str().unwrap().to_string();
        assert_eq!(etag, format!("\"{}\"", kiln_builder::sha256_hex(&body)));
        let (status, h, body) = call(&ctx, get("/ipxe/snponly.efi")).await;
        assert_eq!(
            (
                status,
                body.as_slice(),
                h[header::CONTENT_LENGTH].to_str().unwrap()
            ),
            (StatusCode::OK, &b"MZ efi"[..], "6")
        );
        assert_eq!(
            call(&ctx, get("/ipxe/..%2Fetc%2Fpasswd")).await.0,
            StatusCode::NOT_FOUND
        );

        let req = HttpRequest::get("/images/pxe/rootfs.squashfs")
            .header(header::RANGE, "bytes=9-14")
            .body(Body::empty())
            .unwrap();
        let (status, h, body) = call(&ctx, req).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(body, b"bytes,");
        assert_eq!(h[header::CONTENT_RANGE], "bytes 9-14/26");
        let req = HttpRequest::get("/images/pxe/rootfs.squashfs")
            .header(header::RANGE, "bytes=26-")
            .body(Body::empty())
            .unwrap();
        let (status, h, _) = call(&ctx, req).await;
        assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(h[header::CONTENT_RANGE], "bytes */26");

        // An artifact whose bytes differ from its manifest is never served.
        std::fs::write(d.path().join("pxe/initrd.img"), b"tampered").unwrap();
        let (status, _, body) = call(&ctx, get("/images/pxe/initrd.img")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            String::from_utf8_lossy(&body).contains("does not match its manifest"),
            "{}",
            String::from_utf8_lossy(&body)
        );

        let req = HttpRequest::get("/images/pxe/rootfs.squashfs")
            .header(header::IF_NONE_MATCH, &etag)
            .body(Body::empty())
            .unwrap();
        assert_eq!(call(&ctx, req).await.0, StatusCode::NOT_MODIFIED);

        for uri in [
            "/images/pxe/secret.txt",
            "/images/pxe/manifest.json",
            "/images/nope/rootfs.squashfs",
            "/images/..%2Fpxe/rootfs.squashfs",
            "/images/pxe/..%2Fpxe%2Frootfs.squashfs",
        ] {
            let (status, _, body) = call(&ctx, get(uri)).await;
            assert!(
                status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST,
                "{uri}: {status}"
            );
            assert!(
                !body.starts_with(b"squashfs") && !body.starts_with(b"not an"),
                "{uri}"
            );
        }
    }

    #[tokio::test]
    async fn stages_are_recorded_in_order_and_listed() {
        let d = tempfile::tempdir().unwrap();
        let ctx = context(d.path());
        for stage in ["initramfs", "network", "rootfs", "k3s-started"] {
            let req = HttpRequest::post("/api/v1/stages")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(format!("mac=52:54:00:12:34:56&stage={stage}")))
                .unwrap();
            assert_eq!(call(&ctx, req).await.0, StatusCode::NO_CONTENT);
        }
        let bad = HttpRequest::post("/api/v1/stages")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("mac=52:54:00:12:34:56&stage=%3Cscript%3E"))
            .unwrap();
        assert_eq!(call(&ctx, bad).await.0, StatusCode::BAD_REQUEST);
        let (status, _, body) = call(&ctx, get("/api/machines")).await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let stages: Vec<_> = v[0]["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(v[0]["mac"], "52:54:00:12:34:56");
        assert_eq!(stages, ["initramfs", "network", "rootfs", "k3s-started"]);
        let (_, _, body) = call(&ctx, get("/metrics")).await;
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.contains("kiln_boot_stages_total{stage=\"rootfs\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kiln_http_responses_total{route=\"/api/v1/stages\",status=\"204\"} 4\n"),
            "{text}"
        );
    }

    fn post_form(uri: &str, body: &str) -> HttpRequest<Body> {
        HttpRequest::post(uri)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    #[tokio::test]
    async fn node_configs_go_to_admitted_machines_with_their_secret_only() {
        let d = tempfile::tempdir().unwrap();
        let mut ctx = Arc::into_inner(context(d.path())).unwrap();
        ctx.admission = crate::config::Admission::Allowlist;
        let ctx = Arc::new(ctx);
        let token = ctx.token.expose().to_string();
        let secret = |c: char| c.to_string().repeat(64);
        let ask = |mac: &str, secret: &str| {
            post_form("/api/v1/node-config", &format!("mac={mac}&secret={secret}"))
        };
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();

        // The inventory's server (cp-1) asks first: it starts the cluster.
        let (status, h, body) = call(&ctx, ask("52:54:00:00:00:10", &secret('a'))).await;
        let cfg = text(body);
        assert_eq!(status, StatusCode::OK, "{cfg}");
        assert_eq!(h[header::CONTENT_TYPE], "application/yaml");
        assert!(
            cfg.contains("hostname: \"cp-1\"\nrole: \"server\"\n"),
            "{cfg}"
        );
        assert!(cfg.contains("  cluster-init: true\n"), "{cfg}");
        assert!(cfg.contains(&format!("  token: \"{token}\"\n")), "{cfg}");
        // The second admitted machine joins it as a server, by its address.
        let (status, _, body) = call(&ctx, ask("52:54:00:00:00:0e", &secret('b'))).await;
        let cfg = text(body);
        assert_eq!(status, StatusCode::OK, "{cfg}");
        assert!(
            cfg.contains("  server: \"https://10.0.0.5:6443\"\n"),
            "{cfg}"
        );
        assert!(cfg.contains("hostname: \"kiln-server-1\""), "{cfg}");
        assert!(!cfg.contains("cluster-init"), "{cfg}");

        // Refused, and the token is nowhere in the answer: a MAC outside the
        // allowlist, no secret, a wrong secret, a malformed one.
        for (req, why) in [
            (
                ask("52:54:00:00:00:99", &secret('c')),
                "not in the inventory",
            ),
            (
                post_form("/api/v1/node-config", "mac=52:54:00:00:00:10"),
                "no machine secret",
            ),
            (ask("52:54:00:00:00:10", &secret('b')), "the secret differs"),
            (ask("52:54:00:00:00:10", "abc"), "no machine secret"),
        ] {
            let (status, _, body) = call(&ctx, req).await;
            let body = text(body);
            assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
            assert!(body.contains(why), "{body}");
            assert!(!body.contains(&token), "{body}");
        }
        // The right secret again (a reboot): the same name and role.
        let (status, _, body) = call(&ctx, ask("52:54:00:00:00:0E", &secret('b'))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(text(body).contains("hostname: \"kiln-server-1\""));
        // The machines API shows roles and names, never the token.
        let (_, _, body) = call(&ctx, get("/api/machines")).await;
        let body = text(body);
        assert!(
            body.contains("kiln-server-1") && !body.contains(&token),
            "{body}"
        );
        // A forgotten secret lets the machine enrol again, same name.
        assert!(ctx.state.forget_secret("52:54:00:00:00:10").unwrap());
        let (status, _, body) = call(&ctx, ask("52:54:00:00:00:10", &secret('d'))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(text(body).contains("cluster-init: true"));
        let (status, _, _) = call(&ctx, ask("52:54:00:00:00:10", &secret('a'))).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
}
