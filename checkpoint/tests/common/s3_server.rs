//! A throwaway S3 server for integration tests: s3s-fs (installed by
//! `bash scripts/setup.sh` into `<repo>/.tools/bin`) serving a fresh temporary
//! directory on a free 127.0.0.1 port. One per test; dropping it kills the
//! server and removes the directory. Only std, so any test can include it.
//!
//! ```ignore
//! let s3 = S3Server::start();
//! let store = object_store::aws::AmazonS3Builder::new()
//!     .with_endpoint(&s3.endpoint)
//!     .with_allow_http(true)
//!     .with_region("us-east-1")
//!     .with_access_key_id(&s3.access_key)
//!     .with_secret_access_key(&s3.secret_key)
//!     .with_bucket_name(&s3.bucket)
//!     .build()
//!     .unwrap();
//! ```
//!
//! `s3s-fs` checks `SigV4` signatures and honours `If-None-Match: *`, so
//! `PutMode::Create` on an existing key fails with `Error::AlreadyExists`
//! (`object_store`'s default `S3ConditionalPut::ETagMatch`). Objects are plain
//! files: key `a/b` of the bucket is [`S3Server::object_path`]`("a/b")`.

#![allow(dead_code)]

use std::fs::{self, File};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

const BUCKET: &str = "gantry-test";
const ACCESS_KEY: &str = "gantry-test-access-key";
const SECRET_KEY: &str = "gantry-test-secret-key";
/// How long one attempt waits for the server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts (each on a fresh port) before giving up.
const ATTEMPTS: usize = 5;

pub struct S3Server {
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// Temporary directory: `data/` is the server's root, `s3s-fs.log` its output.
    root: PathBuf,
    child: Child,
}

impl S3Server {
    /// Starts a server with an empty bucket [`S3Server::bucket`]; panics when it
    /// cannot (binary missing, or no attempt came up).
    pub fn start() -> S3Server {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/s3s-fs");
        assert!(
            bin.is_file(),
            "S3 test server not found at {}: run `bash scripts/setup.sh` in the repository root to install it",
            bin.display()
        );
        let root = unique_dir();
        let data = root.join("data");
        fs::create_dir_all(data.join(BUCKET))
            .unwrap_or_else(|e| panic!("creating {}: {e}", data.join(BUCKET).display()));
        let log_path = root.join("s3s-fs.log");

        let mut failures = Vec::new();
        for _ in 0..ATTEMPTS {
            let port = free_port();
            let log = File::create(&log_path).unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(&data)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("cloning the log file handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
            match wait_ready(&mut child, port) {
                Ok(()) => {
                    return S3Server {
                        endpoint: format!("http://127.0.0.1:{port}"),
                        bucket: BUCKET.to_string(),
                        access_key: ACCESS_KEY.to_string(),
                        secret_key: SECRET_KEY.to_string(),
                        root,
                        child,
                    };
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let out = fs::read_to_string(&log_path).unwrap_or_default();
                    failures.push(format!("port {port}: {why}; output: {}", tail(&out, 1000)));
                }
            }
        }
        let _ = fs::remove_dir_all(&root);
        panic!(
            "s3s-fs did not come up in {ATTEMPTS} attempts:\n{}",
            failures.join("\n")
        );
    }

    /// The server's root directory (buckets are its subdirectories).
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Where s3s-fs keeps the object `key` of the bucket (a plain file, for
    /// tests that corrupt or delete objects behind the store's back).
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.data_dir().join(&self.bucket).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A new empty directory under the system temp dir, unique per process and call.
fn unique_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("gantry-s3s-{}-{n}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            // Left over from an earlier process with the same pid: skip it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => panic!("creating {}: {e}", dir.display()),
        }
    }
}

/// A port that was free a moment ago (another process may still take it
/// before the server binds it; `start` retries then).
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
    listener.local_addr().expect("local_addr of a bound listener").port()
}

/// Waits until `child` listens on `port`, or says why not.
fn wait_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("waiting on the server: {e}"))? {
            return Err(format!("server exited with {status}"));
        }
        if TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_millis(200)).is_ok() {
            // Something accepts on the port; make sure it is our server and
            // not another process that took the port first.
            return match listens_on(child.id(), port) {
                Some(true) | None => Ok(()),
                Some(false) => Err("another process is listening on the port".to_string()),
            };
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(format!("not accepting connections after {READY_TIMEOUT:?}"));
        }
        sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` holds the listening socket on 127.0.0.1:`port`
/// (Linux, through /proc); `None` when /proc cannot tell.
fn listens_on(pid: u32, port: u16) -> Option<bool> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let want = format!("0100007F:{port:04X}");
    // Fields: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
    let inode = table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && f[1] == want && f[3] == "0A").then(|| f[9].to_string())
    })?;
    let socket = format!("socket:[{inode}]");
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        fds.flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == socket.as_str())),
    )
}

fn tail(s: &str, max: usize) -> &str {
    let mut i = s.len().saturating_sub(max);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}
