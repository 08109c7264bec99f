use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::EngineError;

/// Where a model runs: `cpu`, `cuda:N` or `metal:N` (a bare `cuda` / `metal` means device 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl DeviceSpec {
    /// Opens the device. A GPU backend missing from this build is reported as such rather
    /// than as a missing device, so the operator knows to rebuild instead of looking for hardware.
    pub(crate) fn open(self) -> Result<Device, EngineError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(EngineError::Device(format!(
                        "{self} requested, but this build has no CUDA support \
                         (rebuild with the `cuda` feature)"
                    )));
                }
                Device::new_cuda(ordinal)
                    .map_err(|e| EngineError::Device(format!("cannot open {self}: {e}")))
            }
            DeviceSpec::Metal(ordinal) => {
                if !candle_core::utils::metal_is_available() {
                    return Err(EngineError::Device(format!(
                        "{self} requested, but this build has no Metal support \
                         (rebuild with the `metal` feature)"
                    )));
                }
                Device::new_metal(ordinal)
                    .map_err(|e| EngineError::Device(format!("cannot open {self}: {e}")))
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

/// The reason a device string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid device `{input}`: expected `cpu`, `cuda:N` or `metal:N`")]
pub struct ParseDeviceError {
    input: String,
}

impl FromStr for DeviceSpec {
    type Err = ParseDeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDeviceError {
            input: s.to_owned(),
        };
        let lower = s.trim().to_ascii_lowercase();
        let (name, ordinal) = match lower.split_once(':') {
            Some((name, n)) => (name, n.parse::<usize>().map_err(|_| err())?),
            None => (lower.as_str(), 0),
        };
        match name {
            "cpu" if !lower.contains(':') => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(ordinal)),
            "metal" => Ok(DeviceSpec::Metal(ordinal)),
            _ => Err(err()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda:0", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("metal:1", DeviceSpec::Metal(1)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
    }

    #[test]
    fn rejects_garbage() {
        for text in [
            "",
            "gpu",
            "cuda:",
            "cuda:x",
            "cpu:0",
            "cuda:-1",
            "metal:1:2",
        ] {
            assert!(
                text.parse::<DeviceSpec>().is_err(),
                "{text} should not parse"
            );
        }
    }

    #[test]
    fn missing_backend_is_a_device_error() {
        if !candle_core::utils::cuda_is_available() {
            let err = DeviceSpec::Cuda(0).open().unwrap_err();
            assert!(err.to_string().contains("no CUDA support"), "{err}");
        }
    }
}
