//! What the hive knows about its machine's devices. Only the CPU for now: its name, cores and
//! system memory, read from `/proc` (zero memory where `/proc` does not exist).

use rbee_contract::{DeviceInfo, DeviceKind};

/// The CPU entry of the hive's device list. Blocking (it reads `/proc`): call it off the reactor.
pub(crate) fn cpu() -> DeviceInfo {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| cpu_name(&text))
        .unwrap_or_else(|| "cpu".into());
    let (memory_total_bytes, memory_free_bytes) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .map(|text| memory(&text))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .ok()
        .and_then(|n| u32::try_from(n.get()).ok());
    DeviceInfo {
        id: "cpu".into(),
        kind: DeviceKind::Cpu,
        name,
        memory_total_bytes,
        memory_free_bytes,
        cores,
        compute_capability: None,
    }
}

/// [`cpu`] on the blocking pool.
pub(crate) async fn cpu_async() -> DeviceInfo {
    tokio::task::spawn_blocking(cpu)
        .await
        .unwrap_or_else(|_| DeviceInfo {
            id: "cpu".into(),
            kind: DeviceKind::Cpu,
            name: "cpu".into(),
            memory_total_bytes: 0,
            memory_free_bytes: 0,
            cores: None,
            compute_capability: None,
        })
}

/// The first `model name` of `/proc/cpuinfo` (x86), else its `Model` or `Hardware` line (ARM).
fn cpu_name(cpuinfo: &str) -> Option<String> {
    ["model name", "Model", "Hardware"].iter().find_map(|key| {
        cpuinfo.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            let value = value.trim();
            (name.trim() == *key && !value.is_empty()).then(|| value.to_owned())
        })
    })
}

/// `(MemTotal, MemAvailable)` of `/proc/meminfo` in bytes.
fn memory(meminfo: &str) -> (u64, u64) {
    let field = |key: &str| {
        meminfo.lines().find_map(|line| {
            let rest = line.strip_prefix(key)?.strip_prefix(':')?.trim();
            let kib: u64 = rest
                .strip_suffix("kB")
                .unwrap_or(rest)
                .trim()
                .parse()
                .ok()?;
            Some(kib * 1024)
        })
    };
    let total = field("MemTotal").unwrap_or(0);
    let free = field("MemAvailable")
        .or_else(|| field("MemFree"))
        .unwrap_or(0);
    (total, free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cpu_name() {
        let x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t: fpu\n";
        assert_eq!(
            cpu_name(x86).as_deref(),
            Some("Intel(R) Xeon(R) CPU @ 2.20GHz")
        );
        let arm = "processor\t: 0\nBogoMIPS\t: 108.00\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n";
        assert_eq!(
            cpu_name(arm).as_deref(),
            Some("Raspberry Pi 4 Model B Rev 1.4")
        );
        assert_eq!(cpu_name("processor\t: 0\n"), None);
    }

    #[test]
    fn reads_memory_in_bytes() {
        let meminfo = "MemTotal:       16384000 kB\nMemFree:         1000000 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(memory(meminfo), (16_384_000 * 1024, 8_192_000 * 1024));
        assert_eq!(
            memory("MemTotal: 2048 kB\nMemFree: 1024 kB\n"),
            (2048 * 1024, 1024 * 1024)
        );
        assert_eq!(memory(""), (0, 0));
    }

    #[test]
    fn this_machine_has_a_cpu() {
        let cpu = cpu();
        assert_eq!((cpu.id.as_str(), cpu.kind), ("cpu", DeviceKind::Cpu));
        assert!(cpu.cores.is_some_and(|n| n > 0));
        if cfg!(target_os = "linux") {
            assert!(cpu.memory_total_bytes > 0);
            assert!(cpu.memory_free_bytes <= cpu.memory_total_bytes);
        }
    }
}
