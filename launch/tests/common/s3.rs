//! An s3s-fs server (installed by `bash scripts/setup.sh` into `<repo>/.tools/bin`, or named
//! by `GANTRY_S3S_FS`) for the `s3://` dataset tests, in a process of its own so that a test
//! can stop it and start it again on the same port and data; killed when dropped.

use super::GANTRY;
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The one bucket the server starts with.
pub const BUCKET: &str = "gantry-test";
pub const ACCESS_KEY: &str = "gantry-test-access-key";
pub const SECRET_KEY: &str = "gantry-test-secret-key";

pub struct Server {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Server {
    /// A server whose data lives in `root/s3`, with an empty [`BUCKET`], accepting connections.
    pub fn start(root: &Path) -> Server {
        let bin = std::env::var_os("GANTRY_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/s3s-fs"));
        assert!(
            bin.is_file(),
            "s3s-fs not found at {}: run scripts/setup.sh",
            bin.display()
        );
        let data = root.join("s3");
        std::fs::create_dir_all(data.join(BUCKET)).unwrap();
        let mut server = Server {
            bin,
            data,
            port: super::free_port(),
            child: None,
        };
        server.up();
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where the server keeps the object `key` of [`BUCKET`] (a plain file, for tests that
    /// look behind the store's back).
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.data.join(BUCKET).join(key)
    }

    /// Start the server process and wait until it accepts connections.
    pub fn up(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Held before waiting, so that a panic below still kills it on drop.
        let child = self.child.insert(child);
        let started = Instant::now();
        while TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, self.port).into(), Duration::from_millis(100)).is_err()
        {
            // An exit (the port taken meanwhile, say) would otherwise read as a slow start.
            if let Ok(Some(status)) = child.try_wait() {
                panic!("s3s-fs on port {} exited with {status}", self.port);
            }
            assert!(started.elapsed() < Duration::from_secs(10), "s3s-fs did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `gantry` with this server's S3 settings.
    pub fn command(&self) -> Command {
        let mut c = Command::new(GANTRY);
        c.env("AWS_ENDPOINT_URL", self.endpoint())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1");
        c
    }

    /// `gantry` with this server's S3 settings and `cache` as the host's data cache.
    pub fn gantry(&self, cache: &Path) -> Command {
        let mut c = self.command();
        c.env("GANTRY_DATA_CACHE", cache);
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.down();
    }
}
