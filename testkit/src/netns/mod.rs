//! A cluster of hosts on one machine: one Linux network namespace per host, each with its
//! own address and host name, cabled to a bridge that joins only them.
//!
//! ```text
//!  gtnK-PID-h0 (hostname h0)     gtnK-PID-h1 (hostname h1)    ...
//!   eth0 198.18.K.1/24            eth0 198.18.K.2/24
//!     │ veth                        │ veth
//!   ┌─p0──────────────── br0 ───────p1──┐   gtnK-PID-sw: the switch, no address at all
//!   └───────────────────────────────────┘
//! ```
//!
//! - Addresses come from the benchmarking range 198.18.0.0/15, one /24 per instance
//!   ([`names`]); hosts have no default route and the switch has no address, so nothing
//!   leaves the cluster and nothing outside reaches into it. IPv6 is off in every namespace.
//! - Processes ([`Host::command`]) enter the host's network namespace and a UTS namespace of
//!   their own named after the host, so `gantry_collectives` sees different hosts (TCP)
//!   between namespaces and one host (shared memory) within one. Threads ([`Host::enter`])
//!   enter the network namespace only: sockets they make stay there (proxies, probes).
//! - Link conditions: [`Cluster::link_down`] / [`Cluster::link_up`] pull and replug a host's
//!   cable (the switch end: a partition), [`Cluster::set_rate`] shapes both directions with
//!   `tc tbf`. This kernel has no `netem`, so [`Cluster::slow_link`] makes a cable slow in
//!   user space: TAP devices at both ends and this process relaying the frames between them
//!   late by a seeded [`delay::DelaySchedule`] (delay, jitter, periodic stalls).
//! - Cleanup: dropping the [`Cluster`] deletes its namespaces (the veths and bridge go with
//!   them). A test killed outright is covered twice: a watchdog process outside the test's
//!   process group deletes them once the test's pid is gone, and every new instance first
//!   sweeps namespaces whose owner pid is gone.
//! - Where namespaces cannot be made (not root, no `ip`, no permission), [`Cluster::start`]
//!   returns [`NetnsError::Unavailable`]; [`start_or_skip`] turns that into one line and a
//!   skip, or a failure in CI.

pub mod delay;
pub mod names;
mod process;
mod slow_link;

pub use delay::LinkProfile;
pub use process::HostProcess;
pub use slow_link::LinkStats;

use names::{NsName, Owner, Role};
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};

/// Where `ip netns add` mounts namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Held (flock) while an instance sweeps, picks its subnet and makes its namespaces, here and
/// in `scripts/netns-cluster.sh`.
pub const LOCK_FILE: &str = "/run/gantry-netns.lock";
/// The bridge in the switch namespace.
const BRIDGE: &str = "br0";
/// Every host's interface.
const HOST_IF: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// This machine cannot make the cluster: tests skip (or fail in CI) with this reason.
    #[error("network namespaces are unavailable here: {0}")]
    Unavailable(String),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("every /24 of 198.18.0.0/15 is taken by a live harness instance")]
    NoSubnet,
    #[error("bad cluster: {0}")]
    BadSpec(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetnsError {
    let what = what.into();
    move |source| NetnsError::Io { what, source }
}

/// One host of a [`Cluster`].
#[derive(Clone, Debug)]
pub struct Host {
    hostname: String,
    netns: String,
    addr: Ipv4Addr,
    /// Its cable's end on the switch.
    port: String,
}

impl Host {
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Its network namespace (`ip -n NAME …`, `ip netns exec NAME …`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    fn netns_path(&self) -> String {
        format!("{NETNS_DIR}/{}", self.netns)
    }

    /// `program` to be run inside this host: its network namespace, its host name, a process
    /// group of its own, and SIGKILL when the spawning thread ends. Spawn it with
    /// [`HostProcess::spawn`] to have the group killed when the handle drops, or run it to
    /// completion with `output()`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        process::enter_on_exec(&mut cmd, &self.netns_path(), &self.hostname);
        cmd
    }

    /// Run `f` on a thread of this process inside the host's network namespace: sockets it
    /// creates (listeners, connections) belong to the host and keep working from any thread.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        process::in_namespace(&self.netns_path(), f).map_err(io_error(format!("entering host {}", self.hostname)))
    }
}

/// A cluster of hosts; dropping it removes everything it made.
pub struct Cluster {
    subnet: u16,
    switch: String,
    hosts: Vec<Host>,
    /// Namespaces made so far, the switch first: what `Drop` deletes.
    made: Vec<String>,
    watchdog: Option<Child>,
    /// Slow cables by host name; stopped (their TAP devices gone) before the namespaces go.
    slow: Mutex<Vec<(String, slow_link::SlowLink)>>,
}

impl Cluster {
    /// A cluster with one host per name in `hostnames`, in that order (host `i` gets
    /// address `.i+1`).
    pub fn start(hostnames: &[&str]) -> Result<Cluster, NetnsError> {
        check_spec(hostnames)?;
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            return Err(NetnsError::Unavailable(format!(
                "not running as root (uid {uid}); network namespaces need CAP_SYS_ADMIN"
            )));
        }
        let lock = lock()?;
        sweep_locked()?;
        let used = names::used_subnets(list_namespaces()?.iter().map(String::as_str));
        let pid = std::process::id();
        let subnet = names::pick_subnet(&used, (pid % u32::from(names::SUBNETS)) as u16).ok_or(NetnsError::NoSubnet)?;
        let name = |role| {
            NsName {
                subnet,
                owner: Owner::Pid(pid),
                role,
            }
            .render()
        };
        let mut cluster = Cluster {
            subnet,
            switch: name(Role::Switch),
            hosts: Vec::new(),
            made: Vec::new(),
            watchdog: None,
            slow: Mutex::default(),
        };
        // The first namespace tells whether this machine can make them at all.
        cluster.add_namespace(&cluster.switch.clone()).map_err(unavailable)?;
        let switch = cluster.switch.clone();
        ip(&["-n", &switch, "link", "add", BRIDGE, "type", "bridge"]).map_err(unavailable)?;
        ip(&["-n", &switch, "link", "set", BRIDGE, "up"])?;
        for (i, hostname) in hostnames.iter().enumerate() {
            let host = Host {
                hostname: hostname.to_string(),
                netns: name(Role::Host(i)),
                addr: names::host_addr(subnet, i),
                port: names::switch_port(i),
            };
            cluster.add_host(&host)?;
            cluster.hosts.push(host);
        }
        drop(lock);
        cluster.watchdog = Some(watchdog(&cluster.made)?);
        cluster.probe_uts()?;
        Ok(cluster)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The host named `hostname`.
    pub fn host(&self, hostname: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.hostname == hostname)
    }

    /// This instance's /24 (its network address).
    pub fn network(&self) -> Ipv4Addr {
        names::network(self.subnet)
    }

    /// The namespace of the switch (the bridge and every host's cable end).
    pub fn switch_netns(&self) -> &str {
        &self.switch
    }

    /// Pull `host`'s cable at the switch: it can reach no other host and no host reaches it
    /// until [`Cluster::link_up`]. Connections stay open; their packets are dropped.
    pub fn link_down(&self, host: &Host) -> Result<(), NetnsError> {
        ip(&["-n", &self.switch, "link", "set", &host.port, "down"])
    }

    pub fn link_up(&self, host: &Host) -> Result<(), NetnsError> {
        ip(&["-n", &self.switch, "link", "set", &host.port, "up"])
    }

    /// Limit `host`'s link to `bits_per_s` (at least 8 kbit/s) in each direction (`tc tbf` on both ends of its
    /// cable), or remove the limit with `None`.
    pub fn set_rate(&self, host: &Host, bits_per_s: Option<u64>) -> Result<(), NetnsError> {
        for (netns, dev) in [
            (host.netns.as_str(), HOST_IF),
            (self.switch.as_str(), host.port.as_str()),
        ] {
            match bits_per_s {
                Some(rate) => {
                    let rate = rate.max(8_000);
                    // A burst of 10 ms of traffic (and at least a few full frames): smaller
                    // buckets cannot even pass one frame per timer tick.
                    let burst = (rate / 8 / 100).max(16 * 1024);
                    let (rate, burst) = (format!("{rate}bit"), burst.to_string());
                    let args = ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate];
                    tc(netns, &[&args[..], &["burst", &burst, "latency", "100ms"]].concat())?;
                }
                None => {
                    // Nothing to remove is fine: the link then has no limit, as asked.
                    let _ = tc(netns, &["qdisc", "del", "dev", dev, "root"]);
                }
            }
        }
        Ok(())
    }

    /// Make `host`'s cable slow per `profile`, in both directions and for every connection
    /// of the host: its veth pair is replaced by a TAP device at each end (`eth0` in the
    /// host, its port on the bridge), and this process relays the frames between them, late
    /// by a [`delay::DelaySchedule`]. Connections open across the swap are cut (their packets
    /// meet a missing device for a moment); do it before starting anything on the host.
    /// [`Cluster::link_down`], [`Cluster::link_up`] and [`Cluster::set_rate`] keep working.
    /// Without `/dev/net/tun` this returns [`NetnsError::Unavailable`] and changes nothing.
    pub fn slow_link(&self, host: &Host, profile: LinkProfile) -> Result<(), NetnsError> {
        profile.check().map_err(NetnsError::BadSpec)?;
        let mut slow = self.slow_links();
        if slow.iter().any(|(h, _)| *h == host.hostname) {
            return Err(NetnsError::BadSpec(format!(
                "host {} already has a slow link",
                host.hostname
            )));
        }
        // Before pulling the veth: a machine without TAP devices keeps its cluster whole.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| NetnsError::Unavailable(format!("cannot open /dev/net/tun for a slow link: {e}")))?;
        let (sw, ns) = (self.switch.as_str(), host.netns.as_str());
        // Deleting the switch end deletes the pair: the host's eth0 goes with it.
        ip(&["-n", sw, "link", "del", &host.port])?;
        let tap = |netns: &str, name: &str| {
            let what = format!("making TAP device {name} in {netns}");
            process::in_namespace(&format!("{NETNS_DIR}/{netns}"), || slow_link::open_tap(name))
                .and_then(|made| made)
                .map_err(io_error(what))
        };
        let host_end = tap(ns, HOST_IF)?;
        let switch_end = tap(sw, &host.port)?;
        ip(&["-n", ns, "addr", "add", &format!("{}/24", host.addr), "dev", HOST_IF])?;
        ip(&["-n", ns, "link", "set", HOST_IF, "up"])?;
        ip(&["-n", sw, "link", "set", &host.port, "master", BRIDGE, "up"])?;
        let link = slow_link::SlowLink::start(host_end, switch_end, profile)
            .map_err(io_error(format!("starting the slow link of host {}", host.hostname)))?;
        slow.push((host.hostname.clone(), link));
        Ok(())
    }

    /// What `host`'s slow link relayed so far; `None` when its cable is not slow.
    pub fn link_stats(&self, host: &Host) -> Option<LinkStats> {
        self.slow_links()
            .iter()
            .find(|(h, _)| *h == host.hostname)
            .map(|(_, l)| l.stats())
    }

    fn slow_links(&self) -> MutexGuard<'_, Vec<(String, slow_link::SlowLink)>> {
        // A panicking test thread must not keep the cluster from cleaning up.
        self.slow.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_namespace(&mut self, netns: &str) -> Result<(), NetnsError> {
        ip(&["netns", "add", netns])?;
        self.made.push(netns.to_string());
        // Only the harness's own IPv4 addresses: no link-local IPv6, router or neighbour
        // solicitations. A kernel without IPv6 has nothing to turn off.
        let path = format!("{NETNS_DIR}/{netns}");
        let _ = process::in_namespace(&path, || {
            for conf in ["default", "all"] {
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
            }
        });
        Ok(())
    }

    /// The host's namespace, its cable (a veth pair: `eth0` in the host, `p<i>` on the
    /// bridge), its address and loopback.
    fn add_host(&mut self, host: &Host) -> Result<(), NetnsError> {
        let (sw, ns) = (self.switch.clone(), host.netns.as_str());
        self.add_namespace(ns)?;
        let veth = [
            "-n", &sw, "link", "add", &host.port, "type", "veth", "peer", "name", HOST_IF, "netns", ns,
        ];
        ip(&veth).map_err(unavailable)?;
        ip(&["-n", &sw, "link", "set", &host.port, "master", BRIDGE, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{}/24", host.addr), "dev", HOST_IF])?;
        ip(&["-n", ns, "link", "set", HOST_IF, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    /// A process in the first host sees the host's name: the UTS namespace works here.
    fn probe_uts(&self) -> Result<(), NetnsError> {
        let Some(host) = self.hosts.first() else { return Ok(()) };
        let out = host
            .command("cat")
            .arg("/proc/sys/kernel/hostname")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                NetnsError::Unavailable(format!("cannot start a process inside host {}: {e}", host.hostname))
            })?;
        let seen = String::from_utf8_lossy(&out.stdout);
        if seen.trim() != host.hostname {
            return Err(NetnsError::Unavailable(format!(
                "a process in host {} sees host name `{}`",
                host.hostname,
                seen.trim()
            )));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Relays first: their TAP devices go with their files.
        self.slow_links().clear();
        // The switch first: deleting it takes every veth pair (both ends) and the bridge,
        // even if a process still holds a host's namespace open.
        for netns in &self.made {
            if let Err(e) = ip(&["netns", "del", netns]) {
                eprintln!("netns harness: cannot delete namespace {netns}: {e}");
            }
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

fn check_spec(hostnames: &[&str]) -> Result<(), NetnsError> {
    if hostnames.is_empty() || hostnames.len() > names::MAX_HOSTS {
        return Err(NetnsError::BadSpec(format!(
            "{} hosts; a cluster has 1 to {}",
            hostnames.len(),
            names::MAX_HOSTS
        )));
    }
    let mut seen = BTreeSet::new();
    for h in hostnames {
        names::check_hostname(h).map_err(NetnsError::BadSpec)?;
        if !seen.insert(*h) {
            return Err(NetnsError::BadSpec(format!("host name `{h}` is given twice")));
        }
    }
    Ok(())
}

/// A failure that says the machine cannot do this (rather than that the harness is wrong).
fn unavailable(e: NetnsError) -> NetnsError {
    match e {
        NetnsError::Command { command, stderr } => NetnsError::Unavailable(format!("`{command}`: {stderr}")),
        other => other,
    }
}

/// The lock every instance holds while it sweeps, picks a subnet and makes namespaces.
fn lock() -> Result<std::fs::File, NetnsError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .map_err(|e| NetnsError::Unavailable(format!("cannot open {LOCK_FILE}: {e}")))?;
    file.lock().map_err(io_error(format!("locking {LOCK_FILE}")))?;
    Ok(file)
}

/// Namespaces mounted under `/run/netns` (none when it does not exist).
fn list_namespaces() -> Result<Vec<String>, NetnsError> {
    match std::fs::read_dir(NETNS_DIR) {
        Ok(dir) => Ok(dir
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_error(format!("listing {NETNS_DIR}"))(e)),
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Delete the namespaces of harness instances whose process is gone; returns their names.
pub fn sweep() -> Result<Vec<String>, NetnsError> {
    let _lock = lock()?;
    sweep_locked()
}

fn sweep_locked() -> Result<Vec<String>, NetnsError> {
    let all = list_namespaces()?;
    let gone = names::leftovers(all.iter().map(String::as_str), pid_alive);
    for netns in &gone {
        // Another sweeper (the instance's own watchdog) may have been first.
        let _ = ip(&["netns", "del", netns]);
    }
    Ok(gone)
}

/// A process outside the test's process group (so a test runner killing the group spares it)
/// that deletes `namespaces` once this process is gone. Dropping the cluster kills it.
fn watchdog(namespaces: &[String]) -> Result<Child, NetnsError> {
    let script = "while kill -0 \"$1\" 2>/dev/null; do sleep 1; done; shift; \
                  for ns in \"$@\"; do ip netns del \"$ns\" 2>/dev/null; done";
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script, "gantry-netns-watchdog", &std::process::id().to_string()])
        .args(namespaces)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map_err(io_error("starting the namespace watchdog (sh)"))
}

fn run(program: &str, args: &[&str]) -> Result<(), NetnsError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => NetnsError::Unavailable(format!("`{program}` (iproute2) is not installed")),
            _ => io_error(format!("running `{command}`"))(e),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(NetnsError::Command { command, stderr });
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    run("ip", args)
}

fn tc(netns: &str, args: &[&str]) -> Result<(), NetnsError> {
    run("tc", &[&["-n", netns][..], args].concat())
}

/// [`Cluster::start`], or `None` after one line on stderr saying why the test `test` is
/// skipped when this machine cannot make namespaces. In CI (`ci`: the caller read `CI=true`)
/// a missing capability fails the test instead: a skipped test there would pass silently.
pub fn start_or_skip(test: &str, hostnames: &[&str], ci: bool) -> Option<Cluster> {
    match Cluster::start(hostnames) {
        Ok(cluster) => Some(cluster),
        Err(NetnsError::Unavailable(why)) if !ci => {
            eprintln!("SKIP {test}: network namespaces unavailable: {why}");
            None
        }
        Err(e) => panic!("{test}: cannot build the namespace cluster: {e}"),
    }
}
