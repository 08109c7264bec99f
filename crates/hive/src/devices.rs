//! What the hive knows about its machine's devices: the CPU with system memory (from
//! `sysinfo`, within the hive's cgroup limit when it has one), NVIDIA GPUs from NVML, and with
//! the `metal` feature on macOS the Apple GPU.
//!
//! NVML is loaded at run time, once per hive process: a machine without the NVIDIA driver
//! reports no CUDA device, which is a normal answer and never an error. The hive reads the GPUs
//! through [`Gpus`], which is NVML in the service ([`nvml_gpus`]) and fixed answers in tests, so
//! that placement on GPUs is tested on machines without one. This module only reads; what fits
//! where is `capacity`'s business. Every read blocks (files under `/proc`, driver calls), so the
//! async side goes through [`read_async`].

use std::sync::{Arc, OnceLock};

use nvml_wrapper::Nvml;
use rbee_contract::{DeviceInfo, DeviceKind};
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, System};

/// One NVIDIA GPU, as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gpu {
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
    /// `(major, minor)`, e.g. `(8, 0)` for an A100; `None` when the driver does not say.
    pub compute_capability: Option<(u32, u32)>,
}

/// Where the hive reads its NVIDIA GPUs: the seam between the hive and NVML. Indices are NVML's,
/// which become the devices' `cuda:N` ids. Blocking.
pub(crate) trait Gpus: Send + Sync {
    /// How many GPUs there are; `Ok(0)` where there is no driver.
    fn count(&self) -> Result<u32, String>;
    /// GPU `index`, read now (its free memory changes as programs use it).
    fn describe(&self, index: u32) -> Result<Gpu, String>;
}

/// The GPUs NVML reports, or none where the library or the driver is missing.
pub(crate) fn nvml_gpus() -> Arc<dyn Gpus> {
    Arc::new(NvmlGpus(nvml()))
}

struct NvmlGpus(Option<&'static Nvml>);

impl Gpus for NvmlGpus {
    fn count(&self) -> Result<u32, String> {
        match self.0 {
            None => Ok(0),
            Some(nvml) => nvml.device_count().map_err(|e| e.to_string()),
        }
    }

    fn describe(&self, index: u32) -> Result<Gpu, String> {
        let nvml = self.0.ok_or("NVML is not loaded")?;
        let described = nvml.device_by_index(index).and_then(|device| {
            let memory = device.memory_info()?;
            Ok(Gpu {
                name: device.name()?,
                memory_total_bytes: memory.total,
                memory_free_bytes: memory.free,
                compute_capability: device.cuda_compute_capability().ok().and_then(|c| {
                    Some((u32::try_from(c.major).ok()?, u32::try_from(c.minor).ok()?))
                }),
            })
        });
        described.map_err(|e| e.to_string())
    }
}

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

/// Reads every device, the NVIDIA GPUs from `gpus`. Blocking: call it off the reactor.
pub(crate) fn read(gpus: &dyn Gpus) -> Devices {
    let memory = system_memory();
    let mut gpus = cuda_devices(gpus);
    gpus.extend(metal_devices(&memory));
    Devices {
        cpu: cpu(&memory),
        gpus,
    }
}

/// [`read`] on the blocking pool.
pub(crate) async fn read_async(gpus: Arc<dyn Gpus>) -> Devices {
    match tokio::task::spawn_blocking(move || read(gpus.as_ref())).await {
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
/// without `CUDA_VISIBLE_DEVICES`). A GPU that cannot be described is left out, with a log; the
/// others keep their index.
fn cuda_devices(gpus: &dyn Gpus) -> Vec<DeviceInfo> {
    let count = match gpus.count() {
        Ok(count) => count,
        Err(err) => {
            tracing::warn!(error = %err, "NVML cannot count the GPUs");
            return Vec::new();
        }
    };
    (0..count)
        .filter_map(|index| match gpus.describe(index) {
            Ok(gpu) => Some(DeviceInfo {
                id: format!("cuda:{index}"),
                kind: DeviceKind::Cuda,
                name: gpu.name,
                memory_total_bytes: gpu.memory_total_bytes,
                memory_free_bytes: gpu.memory_free_bytes,
                cores: None,
                compute_capability: gpu
                    .compute_capability
                    .map(|(major, minor)| format!("{major}.{minor}")),
            }),
            Err(err) => {
                tracing::warn!(index, error = %err, "NVML cannot describe a GPU");
                None
            }
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
pub(crate) mod tests {
    use std::ffi::OsStr;

    use super::*;

    const GIB: u64 = 1 << 30;

    /// GPUs with fixed answers, for tests: `Err` entries are GPUs the driver cannot describe.
    pub(crate) struct FakeGpus(pub Vec<Result<Gpu, String>>);

    impl Gpus for FakeGpus {
        fn count(&self) -> Result<u32, String> {
            Ok(u32::try_from(self.0.len()).expect("a handful of fake GPUs"))
        }

        fn describe(&self, index: u32) -> Result<Gpu, String> {
            self.0[index as usize].clone()
        }
    }

    /// A GPU named `name` with `total` bytes of which `free` are free, compute capability 8.0.
    pub(crate) fn gpu(name: &str, total: u64, free: u64) -> Result<Gpu, String> {
        Ok(Gpu {
            name: name.into(),
            memory_total_bytes: total,
            memory_free_bytes: free,
            compute_capability: Some((8, 0)),
        })
    }

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
        let devices = read(nvml_gpus().as_ref());
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
        let devices = read(&NvmlGpus(None));
        assert!(devices.gpus.is_empty());
        assert_eq!(devices.all().len(), 1, "the CPU alone");
        // Whatever this machine has, asking never fails and every GPU is named `cuda:N`.
        assert!(
            cuda_devices(nvml_gpus().as_ref())
                .iter()
                .enumerate()
                .all(|(n, gpu)| gpu.id == format!("cuda:{n}") && gpu.kind == DeviceKind::Cuda)
        );
    }

    #[test]
    fn the_gpus_the_driver_reports_are_the_hives_cuda_devices() {
        let gpus = FakeGpus(vec![
            gpu("NVIDIA L4", 24 * GIB, 22 * GIB),
            Ok(Gpu {
                compute_capability: Some((9, 0)),
                ..gpu("NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB).unwrap()
            }),
        ]);
        let devices = read(&gpus);
        let all = devices.all();
        // What the heartbeat and `GET /v1/devices` carry: the CPU, then each GPU.
        assert_eq!(
            all.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["cpu", "cuda:0", "cuda:1"]
        );
        assert_eq!(
            all[1],
            DeviceInfo {
                id: "cuda:0".into(),
                kind: DeviceKind::Cuda,
                name: "NVIDIA L4".into(),
                memory_total_bytes: 24 * GIB,
                memory_free_bytes: 22 * GIB,
                cores: None,
                compute_capability: Some("8.0".into()),
            }
        );
        assert_eq!(all[2].compute_capability.as_deref(), Some("9.0"));
        assert_eq!(all[2].memory_free_bytes, 79 * GIB);
        assert_eq!(devices.find("cuda:1"), Some(&all[2]));
    }

    #[test]
    fn a_gpu_the_driver_cannot_describe_is_left_out_and_the_others_keep_their_index() {
        let gpus = FakeGpus(vec![
            Err("GPU is lost".into()),
            gpu("NVIDIA A10", 24 * GIB, 23 * GIB),
        ]);
        let ids: Vec<String> = read(&gpus).gpus.into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["cuda:1"]);

        struct Uncountable;
        impl Gpus for Uncountable {
            fn count(&self) -> Result<u32, String> {
                Err("driver/library version mismatch".into())
            }
            fn describe(&self, _: u32) -> Result<Gpu, String> {
                unreachable!("nothing is described when nothing can be counted")
            }
        }
        assert!(read(&Uncountable).gpus.is_empty());
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
