//! A real Prometheus server (Debian's `prometheus`) on loopback, scraping one target
//! with the project's scrape configuration; killed by pid and its data removed on drop.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// The project's scrape configuration.
pub const SCRAPE_CONFIG: &str = include_str!("../../dashboards/prometheus.yml");

/// A running Prometheus.
pub struct TestPrometheus {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl TestPrometheus {
    /// Starts Prometheus with `dashboards/prometheus.yml`, its target replaced by
    /// `target` and its interval shortened to `interval` so a test sees several samples.
    pub fn start(test: &str, target: &str, interval: &str) -> Self {
        let binary = "/usr/bin/prometheus";
        assert!(
            Path::new(binary).exists(),
            "{binary} is missing: `cargo xtask setup` installs Debian's prometheus"
        );
        let dir = crate::scratch_dir(&format!("prometheus-{test}"));
        let config = SCRAPE_CONFIG.replace("127.0.0.1:9477", target).replace(
            "scrape_interval: 5s",
            &format!("scrape_interval: {interval}"),
        );
        assert_ne!(
            config, SCRAPE_CONFIG,
            "dashboards/prometheus.yml lost its default target"
        );
        fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let port = crate::daemon::free_port();
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus");
        let prometheus = Self { child, dir, port };
        prometheus.wait_ready();
        prometheus
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self
                .get("/-/ready")
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("prometheus on port {} not ready within 60 s", self.port);
    }

    /// A raw HTTP GET; the whole response, or None if the server is unreachable.
    pub fn get(&self, path_and_query: &str) -> Option<String> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        );
        conn.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        conn.read_to_string(&mut response).ok()?;
        Some(response)
    }

    /// Runs an instant PromQL query; returns the JSON `data.result` array.
    pub fn query(&self, expr: &str) -> serde_json::Value {
        let response = self
            .get(&format!("/api/v1/query?query={}", percent_encode(expr)))
            .expect("prometheus unreachable");
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        // Connection: close answers are not chunked by Prometheus; tolerate a chunk
        // header anyway by starting at the first brace.
        let body = &body[body.find('{').unwrap_or(0)..];
        let end = body.rfind('}').map_or(body.len(), |i| i + 1);
        let json: serde_json::Value = serde_json::from_str(&body[..end])
            .unwrap_or_else(|e| panic!("bad answer to {expr} ({e}): {response}"));
        assert_eq!(json["status"], "success", "query {expr} failed: {json}");
        json["data"]["result"].clone()
    }
}

impl Drop for TestPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
