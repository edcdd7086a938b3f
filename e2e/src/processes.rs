//! Starting and killing the data plane's processes.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process started through a [`Launcher`]; killed with SIGKILL when dropped.
pub struct Proc {
    pub pid: i32,
}

impl Proc {
    pub fn kill9(&mut self) {
        // SAFETY: kill only sends a signal to a pid this suite started.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Path::new(&format!("/proc/{}", self.pid)).exists() {
            let zombie = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .map(|s| s.split(' ').nth(2) == Some("Z"))
                .unwrap_or(true);
            if zombie || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts processes from a shell spawned before the suite opens any file on a mount. A
/// process the suite spawned itself would inherit its open FUSE files, and exec closes them,
/// which sends FLUSH to the daemon being restarted: the new daemon would wait on itself. (On
/// a node the kubelet starts the daemon, holding no such files.)
pub struct Launcher {
    shell: Child,
    stdin: std::process::ChildStdin,
    dir: PathBuf,
    started: u32,
}

impl Launcher {
    /// Logs and pid files go to `dir`.
    pub fn new(dir: &Path) -> Launcher {
        let mut shell = Command::new("sh")
            .arg("-s")
            .stdin(Stdio::piped())
            .spawn()
            .expect("start the launcher shell");
        let stdin = shell.stdin.take().expect("launcher stdin");
        Launcher {
            shell,
            stdin,
            dir: dir.to_path_buf(),
            started: 0,
        }
    }

    /// Runs `program args…` in the background, its output in `<dir>/<name>.log`.
    pub fn launch(&mut self, name: &str, program: &Path, args: &[String]) -> Proc {
        self.started += 1;
        let pidfile = self.dir.join(format!("pid-{}", self.started));
        let log = self.dir.join(format!("{name}.log"));
        let quoted: Vec<String> = std::iter::once(program.to_string_lossy().into_owned())
            .chain(args.iter().cloned())
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        writeln!(
            self.stdin,
            "{} >>'{}' 2>&1 & echo $! > '{}'",
            quoted.join(" "),
            log.display(),
            pidfile.display()
        )
        .expect("launcher");
        self.stdin.flush().expect("launcher");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return Proc { pid };
            }
            assert!(Instant::now() < deadline, "the launcher did not start {name}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

/// A binary of the workspace, built beside the test (`make e2e` builds them first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing; build it first: cargo build --bins --example s3-test-server (make e2e does)",
        bin.display()
    );
    bin
}

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

pub fn wait_for_port(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_for_path(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} did not create {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain HTTP GET on loopback (the metrics endpoints, Prometheus' API): the body.
pub fn http_get(addr: SocketAddr, path_and_query: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.split(' ').nth(1) == Some("200") => {
            Ok(body.to_string())
        }
        _ => Err(std::io::Error::other(format!(
            "GET {path_and_query} from {addr}: {}",
            response.lines().next().unwrap_or("no response")
        ))),
    }
}
