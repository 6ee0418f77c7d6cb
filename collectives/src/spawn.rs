//! Start a world of rank processes on this host: the launcher hosts the rendezvous store
//! ([`HostedStore`]) and passes each child the variables [`RankEnv`] writes, with
//! `GANTRY_STORE_EXTERNAL=1` (so rank 0 joins the launcher's store instead of serving one) and
//! a job secret the store generates for this run alone.
//! The `gantry` binary's one local rank supervisor (`launch/src/local_ranks.rs`, behind
//! `--local`, `--nproc`, `gantry eval` and `gantry bench collectives`) uses [`HostedStore`];
//! [`spawn_local_world`] is the multi-process tests' small harness (this crate cannot use the
//! binary's supervisor).

use crate::auth::{JobAuth, JobSecret, Party};
use crate::rank_env::{Bootstrap, RankEnv};
use crate::shm::remove_session_files;
use crate::store::{Store, StoreError, StoreServer, TcpStore};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A rendezvous store a launcher serves on `127.0.0.1` for the ranks it starts, with a fresh
/// job secret: one per run (the job id it binds is empty, attempt 1).
pub struct HostedStore {
    server: StoreServer,
    auth: JobAuth,
}

impl HostedStore {
    pub fn bind() -> Result<HostedStore, StoreError> {
        let secret = JobSecret::generate().map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
        let auth = JobAuth::new(secret, "", 1);
        Ok(HostedStore {
            server: StoreServer::bind("127.0.0.1:0", Some(auth.clone()))?,
            auth,
        })
    }

    pub fn port(&self) -> u16 {
        self.server.local_addr().port()
    }

    /// What the ranks of this store prove (for a launcher or test that talks to them).
    pub fn auth(&self) -> &JobAuth {
        &self.auth
    }

    /// Connections the store closed because they failed the handshake, so far.
    pub fn refused_connections(&self) -> u64 {
        self.server.refused_connections()
    }

    /// The environment of rank `rank` of `world` ranks joining this store.
    pub fn rank_env(&self, rank: usize, world: usize) -> RankEnv {
        RankEnv::new(Bootstrap {
            auth: Some(self.auth.clone()),
            ..Bootstrap::local(rank, world, self.port(), true)
        })
    }

    /// Shared-memory ring files are unlinked once both ends map them; a rank that died before
    /// its peer attached leaves its half behind. The launcher hosts the store, so it knows
    /// the session and removes what is left once every rank is gone.
    pub fn remove_ring_files(&self) {
        let addr = self.server.local_addr().to_string();
        let Ok(client) = TcpStore::connect(&addr, Duration::from_secs(2), Some(self.auth.clone()), Party::Launcher)
        else {
            return;
        };
        if let Ok(Some(session)) = client.try_get("gantry/session") {
            let session = String::from_utf8_lossy(&session).into_owned();
            let _ = remove_session_files(Path::new("/dev/shm"), &session);
        }
    }
}

pub struct LocalWorld {
    /// Kept alive for the children's lifetime.
    pub store: HostedStore,
    /// Children in rank order.
    pub children: Vec<Child>,
}

/// Spawn `world` copies of `program args…` as ranks 0..world, their stdout and stderr piped
/// for the caller (the tests) to read.
pub fn spawn_local_world(
    program: &Path,
    args: &[OsString],
    world: usize,
    extra_env: &[(String, String)],
) -> Result<LocalWorld, StoreError> {
    let store = HostedStore::bind()?;
    let mut children = Vec::with_capacity(world);
    for rank in 0..world {
        let mut cmd = Command::new(program);
        cmd.args(args).envs(store.rank_env(rank, world).vars());
        cmd.envs(extra_env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
        // A rank must not outlive its launcher (a killed launcher would leave ranks waiting
        // on each other until their deadlines).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                for mut c in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(StoreError::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot start rank {rank} ({}): {e}", program.display()),
                )));
            }
        }
    }
    Ok(LocalWorld { store, children })
}

impl LocalWorld {
    /// Wait for every rank, up to `timeout`; ranks still running then are killed and reported
    /// as `None`.
    pub fn wait_all(&mut self, timeout: Duration) -> Vec<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut status: Vec<Option<ExitStatus>> = vec![None; self.children.len()];
        loop {
            for (i, c) in self.children.iter_mut().enumerate() {
                if status[i].is_none() {
                    status[i] = c.try_wait().ok().flatten();
                }
            }
            if status.iter().all(Option::is_some) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for (i, c) in self.children.iter_mut().enumerate() {
            if status[i].is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.store.remove_ring_files();
        status
    }

    /// Kill every rank still running (used when one rank fails so the others don't linger).
    pub fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
    }
}
