//! A real Prometheus (Debian's package) scraping the daemons, and the dashboards' queries
//! run against it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::processes::{free_addr, http_get};

fn program() -> String {
    std::env::var("GRANARY_PROMETHEUS").unwrap_or_else(|_| "prometheus".into())
}

pub fn available() -> bool {
    Command::new(program())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A scrape job: its name, and targets with their extra labels.
pub struct Job {
    pub name: &'static str,
    pub targets: Vec<(SocketAddr, Vec<(&'static str, String)>)>,
}

pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `jobs` every second; data and log under `dir`.
    pub fn start(dir: &Path, jobs: &[Job]) -> Prometheus {
        let mut config = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for job in jobs {
            config.push_str(&format!("  - job_name: {}\n    static_configs:\n", job.name));
            for (addr, labels) in &job.targets {
                config.push_str(&format!("      - targets: ['{addr}']\n"));
                if !labels.is_empty() {
                    config.push_str("        labels:\n");
                    for (k, v) in labels {
                        config.push_str(&format!("          {k}: '{v}'\n"));
                    }
                }
            }
        }
        std::fs::create_dir_all(dir).expect("prometheus dir");
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let addr = free_addr();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus.log");
        let child = Command::new(program())
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, addr };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(addr, "/-/ready").is_err() {
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready: {}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    /// An instant query: `Ok(result)` (the vector), or the parse/evaluation error.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let body = http_get(self.addr, &format!("/api/v1/query?query={}", encode(expr))).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until every target's last scrape succeeded.
    pub fn wait_all_up(&self, expected: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = self.query("up == 1").map(|r| r.len()).unwrap_or(0);
            if up == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{up} of {expected} targets up: {:?}",
                self.query("up")
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A dashboard query: where it is, and the PromQL with Grafana's variables.
#[derive(Debug)]
pub struct PanelQuery {
    pub dashboard: String,
    pub panel: String,
    pub expr: String,
}

/// Every query of every panel of the chart's dashboards, and each variable's `label_values`.
pub fn dashboard_queries(dir: &Path) -> (Vec<PanelQuery>, Vec<(String, String, String)>) {
    let mut queries = Vec::new();
    let mut variables = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dashboards dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for file in files {
        let board: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("dashboard")).expect("dashboard JSON");
        let title = board["title"].as_str().unwrap_or_default().to_string();
        for panel in board["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                queries.push(PanelQuery {
                    dashboard: title.clone(),
                    panel: panel["title"].as_str().unwrap_or_default().to_string(),
                    expr: target["expr"].as_str().unwrap_or_default().to_string(),
                });
            }
        }
        for var in board["templating"]["list"].as_array().into_iter().flatten() {
            if let Some(q) = var["query"]["query"].as_str() {
                if let Some(args) = q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
                    if let Some((metric, label)) = args.split_once(',') {
                        variables.push((title.clone(), metric.trim().to_string(), label.trim().to_string()));
                    }
                }
            }
        }
    }
    (queries, variables)
}

/// Grafana's variables as an "All" selection and a rate window of two minutes.
pub fn expand_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "2m")
        .replace("$dataset", ".*")
        .replace("$node", ".*")
}
