//! What the hive knows about its machine's devices: the CPU with system memory (from
//! `sysinfo`, within the hive's cgroup limit when it has one), NVIDIA GPUs from NVML, and with
//! the `metal` feature on macOS the Apple GPU.
//!
//! NVML is loaded at run time, once per hive process: a machine without the NVIDIA driver
//! reports no CUDA device, which is a normal answer and never an error. This module only
//! reads; what fits where is `capacity`'s business. Every read blocks (files under `/proc`,
//! driver calls), so the async side goes through [`read_async`].

use std::sync::OnceLock;

use nvml_wrapper::Nvml;
use rbee_contract::{DeviceInfo, DeviceKind};
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, System};

/// The machine's devices, read now.
#[derive(Debug, Clone)]
pub(crate) struct Devices {
    pub cpu: DeviceInfo,
    pub gpus: Vec<DeviceInfo>,
}

impl Devices {
    /// Every device, the CPU first.
    pub fn all(&self) -> Vec<DeviceInfo> {
        std::iter::once(self.cpu.clone())
            .chain(self.gpus.iter().cloned())
            .collect()
    }

    pub fn find(&self, id: &str) -> Option<&DeviceInfo> {
        std::iter::once(&self.cpu)
            .chain(&self.gpus)
            .find(|d| d.id == id)
    }
}

/// The canonical spelling of a device id: `cpu`, `cuda:N`, `metal:N` (`cuda` alone is
/// `cuda:0`); `None` for anything else.
pub(crate) fn parse_id(text: &str) -> Option<String> {
    let lower = text.trim().to_ascii_lowercase();
    let (kind, ordinal) = match lower.split_once(':') {
        Some((kind, n)) => (kind, Some(n.parse::<u32>().ok()?)),
        None => (lower.as_str(), None),
    };
    match (kind, ordinal) {
        ("cpu", None) => Some("cpu".into()),
        ("cuda" | "metal", ordinal) => Some(format!("{kind}:{}", ordinal.unwrap_or(0))),
        _ => None,
    }
}

/// Reads every device. Blocking: call it off the reactor.
pub(crate) fn read() -> Devices {
    let memory = system_memory();
    let mut gpus = cuda_devices(nvml());
    gpus.extend(metal_devices(&memory));
    Devices {
        cpu: cpu(&memory),
        gpus,
    }
}

/// [`read`] on the blocking pool.
pub(crate) async fn read_async() -> Devices {
    match tokio::task::spawn_blocking(read).await {
        Ok(devices) => devices,
        Err(err) => {
            // Only a panic in a device library gets here; the hive still describes its CPU.
            tracing::warn!(error = %err, "reading the devices failed");
            Devices {
                cpu: cpu(&SystemMemory::default()),
                gpus: Vec::new(),
            }
        }
    }
}

/// System memory in bytes, within the cgroup limit when the hive runs in one (a container's
/// limit is what its workers can use, whatever the host has).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SystemMemory {
    total: u64,
    available: u64,
}

fn system_memory() -> SystemMemory {
    let mut system = System::new();
    system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
    let host = SystemMemory {
        total: system.total_memory(),
        available: system.available_memory(),
    };
    let cgroup = system
        .cgroup_limits()
        .map(|limits| (limits.total_memory, limits.free_memory));
    within_cgroup(host, cgroup)
}

/// The host's memory, cut down to a cgroup's `(total, free)` where that is smaller.
fn within_cgroup(host: SystemMemory, cgroup: Option<(u64, u64)>) -> SystemMemory {
    match cgroup {
        Some((total, free)) if total > 0 => SystemMemory {
            total: host.total.min(total),
            available: host.available.min(free),
        },
        _ => host,
    }
}

/// The CPU's brand and logical core count, which do not change while the hive runs.
struct CpuModel {
    name: String,
    cores: Option<u32>,
}

fn cpu_model() -> &'static CpuModel {
    static MODEL: OnceLock<CpuModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let mut system = System::new();
        system.refresh_cpu_list(CpuRefreshKind::nothing());
        let name = system
            .cpus()
            .iter()
            .map(|cpu| cpu.brand().trim())
            .find(|brand| !brand.is_empty())
            .map_or_else(|| "cpu".to_owned(), str::to_owned);
        // What the process may use (cgroup quota, affinity), which is what a worker gets.
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .ok()
            .or_else(|| (!system.cpus().is_empty()).then(|| system.cpus().len()))
            .and_then(|n| u32::try_from(n).ok());
        CpuModel { name, cores }
    })
}

fn cpu(memory: &SystemMemory) -> DeviceInfo {
    let model = cpu_model();
    DeviceInfo {
        id: "cpu".into(),
        kind: DeviceKind::Cpu,
        name: model.name.clone(),
        memory_total_bytes: memory.total,
        memory_free_bytes: memory.available,
        cores: model.cores,
        compute_capability: None,
    }
}

/// NVML, loaded and initialised on first use; `None` (said once, at debug level) where the
/// library or the driver is missing.
fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| match Nvml::init() {
        Ok(nvml) => Some(nvml),
        Err(err) => {
            tracing::debug!(error = %err, "NVML is not available: no CUDA devices reported");
            None
        }
    })
    .as_ref()
}

/// One entry per NVIDIA GPU, `cuda:N` in NVML's index order (the CUDA order on a machine
/// without `CUDA_VISIBLE_DEVICES`). A GPU that cannot be described is left out, with a log.
fn cuda_devices(nvml: Option<&Nvml>) -> Vec<DeviceInfo> {
    let Some(nvml) = nvml else {
        return Vec::new();
    };
    let count = match nvml.device_count() {
        Ok(count) => count,
        Err(err) => {
            tracing::warn!(error = %err, "NVML cannot count the GPUs");
            return Vec::new();
        }
    };
    (0..count)
        .filter_map(|index| {
            let described = nvml.device_by_index(index).and_then(|device| {
                let memory = device.memory_info()?;
                let capability = device
                    .cuda_compute_capability()
                    .map(|c| format!("{}.{}", c.major, c.minor))
                    .ok();
                Ok(DeviceInfo {
                    id: format!("cuda:{index}"),
                    kind: DeviceKind::Cuda,
                    name: device.name()?,
                    memory_total_bytes: memory.total,
                    memory_free_bytes: memory.free,
                    cores: None,
                    compute_capability: capability,
                })
            });
            described
                .map_err(|err| tracing::warn!(index, error = %err, "NVML cannot describe a GPU"))
                .ok()
        })
        .collect()
}

/// The Apple GPU. Its memory is unified with the system's, so it reports the system memory.
#[cfg(all(feature = "metal", target_os = "macos"))]
fn metal_devices(memory: &SystemMemory) -> Vec<DeviceInfo> {
    vec![DeviceInfo {
        id: "metal:0".into(),
        kind: DeviceKind::Metal,
        name: format!("{} GPU", cpu_model().name),
        memory_total_bytes: memory.total,
        memory_free_bytes: memory.available,
        cores: None,
        compute_capability: None,
    }]
}

#[cfg(not(all(feature = "metal", target_os = "macos")))]
fn metal_devices(_memory: &SystemMemory) -> Vec<DeviceInfo> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn device_ids_are_canonical() {
        assert_eq!(parse_id("cpu").as_deref(), Some("cpu"));
        assert_eq!(parse_id(" CUDA:1 ").as_deref(), Some("cuda:1"));
        assert_eq!(parse_id("cuda").as_deref(), Some("cuda:0"));
        assert_eq!(parse_id("metal:0").as_deref(), Some("metal:0"));
        for bad in ["cpu:0", "cuda:x", "cuda:-1", "tpu", "", "gpu:0"] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn this_machine_has_a_cpu_with_memory() {
        let devices = read();
        let cpu = &devices.cpu;
        assert_eq!((cpu.id.as_str(), cpu.kind), ("cpu", DeviceKind::Cpu));
        assert!(!cpu.name.is_empty());
        assert!(cpu.cores.is_some_and(|n| n > 0));
        assert!(cpu.memory_total_bytes > 0);
        assert!(cpu.memory_free_bytes <= cpu.memory_total_bytes);
        assert_eq!(devices.all()[0], *cpu);
        assert_eq!(devices.find("cpu"), Some(cpu));
        assert_eq!(devices.find("cuda:99"), None);
    }

    #[test]
    fn without_nvml_there_are_no_cuda_devices() {
        let missing = Nvml::builder()
            .lib_path(OsStr::new("/nonexistent/rbee/libnvidia-ml.so.1"))
            .init();
        assert!(missing.is_err(), "no NVML library at a made-up path");
        assert!(cuda_devices(missing.ok().as_ref()).is_empty());
        // Whatever this machine has, asking never fails and every GPU is named `cuda:N`.
        assert!(
            cuda_devices(nvml())
                .iter()
                .enumerate()
                .all(|(n, gpu)| gpu.id == format!("cuda:{n}") && gpu.kind == DeviceKind::Cuda)
        );
    }

    #[test]
    fn a_cgroup_limit_caps_the_host_memory() {
        let host = SystemMemory {
            total: 64 << 30,
            available: 40 << 30,
        };
        assert_eq!(within_cgroup(host, None), host);
        assert_eq!(
            within_cgroup(host, Some((8 << 30, 6 << 30))),
            SystemMemory {
                total: 8 << 30,
                available: 6 << 30
            }
        );
        // A limit above the host's memory changes nothing; a zero limit means none.
        assert_eq!(within_cgroup(host, Some((128 << 30, 100 << 30))), host);
        assert_eq!(within_cgroup(host, Some((0, 0))), host);
    }
}
