//! A minimal HTTP server on 127.0.0.1 for the builder's integration tests:
//! GET of files under a directory, 404 for anything else.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub struct Server {
    pub addr: SocketAddr,
    /// The URL path the files are served under, e.g. `/debian` (or empty).
    prefix: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves the files under `root` at `http://ADDR<prefix>/...`, one
    /// request per connection; `%2B` in a path is `+` (k3s tags).
    pub fn start(root: &Path, prefix: &str) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let root = root.to_path_buf();
        let flag = stop.clone();
        let route = format!("{}/", prefix.trim_end_matches('/'));
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (root, route) = (root.clone(), route.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &root, &route);
                });
            }
        });
        Server {
            addr,
            prefix: prefix.trim_end_matches('/').to_string(),
            stop,
            thread: Some(thread),
        }
    }

    /// `http://ADDR<prefix>`.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.prefix)
    }

    pub fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr); // wake up accept()
            thread.join().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve_one(mut stream: TcpStream, root: &Path, route: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("").replace("%2B", "+");
    let file: Option<PathBuf> = target
        .strip_prefix(route)
        .filter(|p| method == "GET" && !p.split('/').any(|c| c == ".." || c.is_empty()))
        .map(|p| root.join(p))
        .filter(|p| p.is_file());
    match file {
        Some(path) => {
            let body = std::fs::read(path)?;
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            stream.write_all(&body)?;
        }
        None => {
            let body = b"not found\n";
            write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            stream.write_all(body)?;
        }
    }
    stream.flush()
}
