//! Running things inside a host: processes (entering the network namespace and a UTS
//! namespace of their own between fork and exec) and threads of the test process (entering
//! the network namespace only, so sockets they make live there).

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Make `cmd` start inside the network namespace mounted at `netns_path` with host name
/// `hostname` (a UTS namespace of its own), as the leader of a new process group, killed
/// when the thread that spawns it ends.
pub(super) fn enter_on_exec(cmd: &mut Command, netns_path: &str, hostname: &str) {
    // Prepared here: between fork and exec nothing may allocate.
    let path = CString::new(netns_path).unwrap_or_default();
    let name = hostname.as_bytes().to_vec();
    // SAFETY: the closure only makes system calls (async-signal-safe) on data prepared before
    // the fork, and touches no lock or allocator.
    unsafe {
        cmd.pre_exec(move || enter_host(&path, &name));
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn enter_host(netns_path: &CString, hostname: &[u8]) -> io::Result<()> {
    // SAFETY (all calls): plain system calls on valid pointers and lengths.
    unsafe {
        let parent = libc::getppid();
        let fd = libc::open(netns_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        check(fd)?;
        let entered = libc::setns(fd, libc::CLONE_NEWNET);
        libc::close(fd);
        check(entered)?;
        // The host's own name: `collectives` tells hosts apart by host name (and boot id),
        // so ranks in different namespaces take TCP between them, shared memory within one.
        check(libc::unshare(libc::CLONE_NEWUTS))?;
        check(libc::sethostname(hostname.as_ptr().cast(), hostname.len()))?;
        // Its own process group, so that dropping the handle stops whatever it started.
        check(libc::setpgid(0, 0))?;
        // A killed test must not leave daemons behind in namespaces about to be swept.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
        if libc::getppid() != parent {
            return Err(io::Error::other("the test process ended while starting a host process"));
        }
    }
    Ok(())
}

/// A process started in a host, killed with its whole process group when dropped.
///
/// It is reaped only when dropped: until then its pid (a zombie's, once it ends) keeps the
/// group's number from being reused, so the group signal can never reach anyone else.
pub struct HostProcess {
    child: Child,
}

impl HostProcess {
    /// Spawn `cmd` (made by [`super::Host::command`], which puts it in a process group of its
    /// own) and keep it until this handle is dropped.
    pub fn spawn(cmd: &mut Command) -> io::Result<HostProcess> {
        Ok(HostProcess { child: cmd.spawn()? })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child, for its pipes. (Waiting on it directly would reap it early; use
    /// [`HostProcess::try_wait`].)
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Its exit status once it has ended, without reaping it.
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        // SAFETY: an all-zero siginfo_t is valid; waitid fills it for our own child.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        check(unsafe { libc::waitid(libc::P_PID, self.child.id(), &mut info, flags) })?;
        // SAFETY: waitid filled the SIGCHLD fields (si_pid stays 0 when nothing ended).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        // Back to the wait(2) status word ExitStatus is made from.
        let raw = match info.si_code {
            libc::CLD_EXITED => (status & 0xff) << 8,
            libc::CLD_DUMPED => status | 0x80,
            _ => status,
        };
        Ok(Some(ExitStatus::from_raw(raw)))
    }

    /// Wait up to `limit` for it to end; `None` if it is still running then.
    pub fn wait_for(&self, limit: Duration) -> io::Result<Option<ExitStatus>> {
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HostProcess {
    /// SIGKILL the process group (what it started in that group dies with it), then reap.
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: a plain signal to the process group this unreaped child leads.
        if unsafe { libc::killpg(pid, libc::SIGKILL) } == -1 {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Run `f` on a thread of this process inside the network namespace at `netns_path`.
pub(super) fn in_namespace<T: Send>(netns_path: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ns = std::fs::File::open(netns_path)?;
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| -> io::Result<T> {
            // Only this thread moves: a network namespace belongs to a thread, not the process.
            // SAFETY: a valid descriptor of a network namespace.
            check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })?;
            Ok(f())
        });
        worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
