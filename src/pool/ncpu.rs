//! How many CPUs this machine has, for sizing pools.

/// Physical cores and logical CPUs of this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ncpu {
    /// Physical cores (hyperthreads of one core counted once).
    pub physical: usize,
    /// Logical CPUs this process may run on.
    pub logical: usize,
}

/// Physical cores and logical CPUs, for sizing pools (AnyEvent::Fork::Pool's
/// `ncpu`). Reads the CPU topology from sysfs, else `/proc/cpuinfo`; falls
/// back to the logical count, and to 1.
///
/// ```
/// let n = forkrpc::ncpu();
/// assert!(n.physical >= 1 && n.logical >= 1);
/// ```
pub fn ncpu() -> Ncpu {
    let logical = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let physical = physical_from_sysfs()
        .or_else(physical_from_cpuinfo)
        .unwrap_or(logical)
        .max(1);
    Ncpu { physical, logical }
}

fn physical_from_sysfs() -> Option<usize> {
    let mut cores = std::collections::BTreeSet::new();
    for e in std::fs::read_dir("/sys/devices/system/cpu").ok()? {
        let e = e.ok()?;
        let name = e.file_name();
        let name = name.to_str()?;
        if name
            .strip_prefix("cpu")
            .is_none_or(|n| n.parse::<u32>().is_err())
        {
            continue;
        }
        let topo = e.path().join("topology");
        let pkg = std::fs::read_to_string(topo.join("physical_package_id")).ok();
        let core = std::fs::read_to_string(topo.join("core_id")).ok();
        if let (Some(p), Some(c)) = (pkg, core) {
            cores.insert((p.trim().to_owned(), c.trim().to_owned()));
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

fn physical_from_cpuinfo() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut cores = std::collections::BTreeSet::new();
    let mut phys = "";
    for line in text.lines() {
        let mut kv = line.splitn(2, ':').map(str::trim);
        match (kv.next(), kv.next()) {
            (Some("physical id"), Some(v)) => phys = v,
            (Some("core id"), Some(v)) => {
                cores.insert((phys.to_owned(), v.to_owned()));
            }
            _ => {}
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}
