//! What this worker offers: hostname, the address other hosts reach it at, CPU slots, GPUs.

use gantry_coordinator::proto::Gpu;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// The host's name (`gethostname`), or "localhost" when it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; the name is NUL-terminated when it fits,
    // and the last byte stays 0 either way.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if name.is_empty() { "localhost".to_string() } else { name }
}

/// Number of CPUs this process may run on.
pub fn cpu_slots() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}

/// The local address the kernel would use to reach `peer`: connecting a UDP socket sends
/// nothing but picks the route, so this is the interface facing the coordinator (127.0.0.1
/// for a coordinator on loopback).
pub fn route_towards(peer: SocketAddr) -> std::io::Result<IpAddr> {
    let local: SocketAddr = match peer {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(peer)?;
    Ok(socket.local_addr()?.ip())
}

/// Host and port of a coordinator URL (`http://h:p`, `https://h:p`, `h:p`), with the
/// scheme's default port when there is none and IPv6 brackets removed.
pub fn url_host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s, r),
        None => ("http", url),
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let default_port = if scheme.eq_ignore_ascii_case("https") { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (authority, default_port),
        }
    };
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// The GPUs the CUDA driver sees, in its numbering. Empty, never an error, when there is no
/// driver or no device: a CPU-only worker is normal. Blocking (`cuInit` can take seconds).
pub fn detect_gpus() -> Vec<Gpu> {
    // SAFETY: dlopens (and closes) the library names cudarc's loader would try.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        tracing::debug!("no CUDA driver library; this worker offers no GPUs");
        return Vec::new();
    }
    // cudarc panics when a symbol is missing from an old driver; treat that as no GPUs.
    let found = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Gpu>, String> {
        use cudarc::driver::result::{self, device};
        let err = |op: &'static str| move |e: cudarc::driver::DriverError| format!("{op}: {:?}", e.0);
        result::init().map_err(err("cuInit"))?;
        let count = device::get_count().map_err(err("cuDeviceGetCount"))?;
        let mut gpus = Vec::new();
        for ordinal in 0..count {
            let dev = device::get(ordinal).map_err(err("cuDeviceGet"))?;
            let model = device::get_name(dev).map_err(err("cuDeviceGetName"))?;
            // SAFETY: `dev` is a handle the driver just returned.
            let memory = unsafe { device::total_mem(dev) }.map_err(err("cuDeviceTotalMem"))?;
            gpus.push(Gpu {
                index: ordinal as u32,
                model,
                memory_bytes: memory as u64,
            });
        }
        Ok(gpus)
    }));
    match found {
        Ok(Ok(gpus)) => gpus,
        Ok(Err(e)) => {
            tracing::warn!("the CUDA driver is present but failed ({e}); this worker offers no GPUs");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!("the CUDA bindings panicked while listing GPUs; this worker offers no GPUs");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let hp = |u: &str| url_host_port(u);
        assert_eq!(hp("http://10.0.0.1:7000"), Some(("10.0.0.1".into(), 7000)));
        assert_eq!(hp("https://coord.example/"), Some(("coord.example".into(), 443)));
        assert_eq!(hp("coord:81"), Some(("coord".into(), 81)));
        assert_eq!(hp("http://[::1]:9000/x"), Some(("::1".into(), 9000)));
        assert_eq!(hp("http://[::1]"), Some(("::1".into(), 80)));
        assert_eq!(hp("http://:80"), None);
        assert_eq!(hp("http://h:notaport"), None);
    }

    #[test]
    fn loopback_route_is_loopback() {
        let ip = route_towards("127.0.0.1:9".parse().unwrap()).unwrap();
        assert_eq!(ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn host_facts_never_fail() {
        assert!(!hostname().is_empty());
        assert!(cpu_slots() >= 1);
        // No GPU on a CPU machine: an empty list, not a failure.
        let _ = detect_gpus();
    }
}
