//! Facts: what a host reports about itself. They reach templates (as `facts`) but never decide
//! which roles or data a node gets.
//!
//! What describes the system image (os-release, machine id, host name) is read inside the
//! managed root; what describes the running machine (kernel, architecture, CPUs, memory,
//! addresses) comes from the machine itself.

use crate::fs::Root;
use converge_modules::providers::tool;
use serde_json::{Map, Value, json};

/// Every fact this agent collects. A fact it cannot read is left out, never guessed.
pub fn collect(root: &Root, node: &str) -> Map<String, Value> {
    let mut f = Map::new();
    let read = |p: &str| root.read_to_string(p).ok();
    let hostname = read("/etc/hostname")
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && !root.is_slash())
        .or_else(|| nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()))
        .unwrap_or_default();
    if !hostname.is_empty() {
        f.insert("hostname".into(), json!(hostname.split('.').next().unwrap_or(&hostname)));
        let fqdn = if hostname.contains('.') { hostname.clone() } else { node.to_string() };
        f.insert("fqdn".into(), json!(fqdn));
    }
    if let Some(os) = read("/etc/os-release").or_else(|| read("/usr/lib/os-release")) {
        let field = |k: &str| tool::os_release_field(&os, k);
        f.insert("os_name".into(), json!(field("ID").unwrap_or_default()));
        if let Some(v) = field("VERSION_ID") {
            f.insert("os_version".into(), json!(v));
        }
        if let Some(family) = tool::os_family(&os) {
            f.insert("os_family".into(), json!(family));
        }
    }
    if let Some(id) = read("/etc/machine-id").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
        f.insert("machine_id".into(), json!(id));
    }
    if let Ok(u) = nix::sys::utsname::uname() {
        f.insert("kernel".into(), json!(u.release().to_string_lossy()));
        f.insert("arch".into(), json!(u.machine().to_string_lossy()));
    }
    if let Ok(n) = std::thread::available_parallelism() {
        f.insert("cpus".into(), json!(n.get()));
    }
    if let Some(mem) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    }) {
        f.insert("memory_mb".into(), json!(mem / 1024));
    }
    let (v4, v6) = addresses();
    if let Some(first) = v4.first() {
        f.insert("ipv4".into(), json!(first));
    }
    f.insert("ipv4_addresses".into(), json!(v4));
    f.insert("ipv6_addresses".into(), json!(v6));
    f
}

/// Non-loopback addresses, IPv4 and IPv6.
fn addresses() -> (Vec<String>, Vec<String>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(addr) = a.address else { continue };
            if let Some(s) = addr.as_sockaddr_in() {
                let ip = s.ip();
                if !ip.is_loopback() {
                    v4.push(ip.to_string());
                }
            } else if let Some(s) = addr.as_sockaddr_in6() {
                let ip = s.ip();
                if !ip.is_loopback() {
                    v6.push(ip.to_string());
                }
            }
        }
    }
    v4.sort();
    v4.dedup();
    v6.sort();
    v6.dedup();
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_reports_its_own_release_and_identity() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("etc")).unwrap();
        std::fs::write(t.path().join("etc/os-release"), "ID=debian\nVERSION_ID=\"12\"\n").unwrap();
        std::fs::write(t.path().join("etc/machine-id"), "abc123\n").unwrap();
        std::fs::write(t.path().join("etc/hostname"), "web01\n").unwrap();
        let root = Root::open(t.path()).unwrap();
        let f = collect(&root, "web01.example.com");
        assert_eq!(f["os_family"], "debian");
        assert_eq!(f["os_version"], "12");
        assert_eq!(f["machine_id"], "abc123");
        assert_eq!(f["hostname"], "web01");
        assert_eq!(f["fqdn"], "web01.example.com");
        assert!(f["cpus"].as_u64().unwrap() >= 1);
        assert!(f["memory_mb"].as_u64().unwrap() > 0);
    }
}
