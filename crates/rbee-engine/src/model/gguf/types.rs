//! The GGML types of a GGUF file's tensors, read from the header by their numbers, for the
//! refusal of a file whose types rbee does not compute.
//!
//! candle's header reader stops at the first tensor of a type it does not know (llama.cpp's IQ
//! and ternary types, among others) and names only its number; this reader walks the header
//! itself to name the tensor and its type as llama.cpp does.

use std::io::{self, Read, Seek, SeekFrom};

/// llama.cpp's name for GGML type number `id` (`ggml.h`'s `enum ggml_type`).
pub(super) fn type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        42 => "Q2_0",
        _ => return None,
    })
}

/// The types rbee computes, for the refusal of the others.
pub(super) const COMPUTED: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, \
                                   Q4_K, Q5_K and Q6_K";

/// Whether rbee computes tensors of GGML type number `id`: every type of llama.cpp's standard
/// presets. Q8_1 and Q8_K are activation formats: candle's model code cannot load them as
/// weights and llama.cpp has no product with them; the rest have no code here.
pub(super) fn computed(id: u32) -> bool {
    matches!(id, 0..=3 | 6..=8 | 10..=14 | 30)
}

/// One tensor's entry in the header.
#[derive(Debug)]
pub(super) struct TensorType {
    pub name: String,
    pub id: u32,
    /// Where in the file the type number is stored.
    #[cfg_attr(not(test), allow(dead_code))]
    pub at: u64,
}

/// Longest tensor name read; far above ggml's 64 bytes, far below an allocation that hurts.
const MAX_NAME_BYTES: u64 = 64 * 1024;

/// The name and type of every tensor in the header of the GGUF file `r` reads (version 2 or 3;
/// version 1, with 32-bit lengths, went out of use in 2023).
pub(super) fn tensor_types<R: Read + Seek>(r: &mut R) -> io::Result<Vec<TensorType>> {
    r.seek(SeekFrom::Start(0))?;
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if &head[..4] != b"GGUF" || !(2..=3).contains(&version) {
        return Err(io::Error::other(format!(
            "not a GGUF file of version 2 or 3 (version {version})"
        )));
    }
    let tensors = u64_of(r)?;
    let kvs = u64_of(r)?;
    for _ in 0..kvs {
        skip_string(r)?;
        let ty = u32_of(r)?;
        skip_value(r, ty)?;
    }
    let mut out = Vec::new();
    for _ in 0..tensors {
        let len = u64_of(r)?;
        // The length comes from the file: bound it before allocating (ggml's names hold 64 bytes).
        if len > MAX_NAME_BYTES {
            return Err(io::Error::other(format!(
                "a tensor name of {len} bytes (at most {MAX_NAME_BYTES})"
            )));
        }
        let mut name = vec![0u8; len as usize];
        r.read_exact(&mut name)?;
        let dims = u32_of(r)?;
        r.seek(SeekFrom::Current(8 * i64::from(dims)))?;
        let at = r.stream_position()?;
        let id = u32_of(r)?;
        u64_of(r)?;
        out.push(TensorType {
            name: String::from_utf8_lossy(&name).into_owned(),
            id,
            at,
        });
    }
    Ok(out)
}

fn u32_of<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn u64_of<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn skip_string<R: Read + Seek>(r: &mut R) -> io::Result<()> {
    let len = u64_of(r)?;
    skip(r, len)
}

/// Bytes of a metadata value of fixed size of GGUF value type `ty`.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn skip<R: Seek>(r: &mut R, bytes: u64) -> io::Result<()> {
    let bytes = i64::try_from(bytes).map_err(|_| io::Error::other("a value longer than a file"))?;
    r.seek(SeekFrom::Current(bytes)).map(drop)
}

/// Skips a metadata value of GGUF value type `ty`.
fn skip_value<R: Read + Seek>(r: &mut R, ty: u32) -> io::Result<()> {
    if let Some(size) = fixed_size(ty) {
        return skip(r, size);
    }
    match ty {
        8 => skip_string(r),
        9 => {
            let item = u32_of(r)?;
            let count = u64_of(r)?;
            match fixed_size(item) {
                Some(size) => skip(
                    r,
                    count
                        .checked_mul(size)
                        .ok_or_else(|| io::Error::other("an array longer than a file"))?,
                ),
                None => (0..count).try_for_each(|_| skip_value(r, item)),
            }
        }
        _ => Err(io::Error::other(format!(
            "unknown metadata value type {ty}"
        ))),
    }
}

/// The first tensor in `tensors` of a type rbee does not compute.
pub(super) fn first_uncomputed(tensors: &[TensorType]) -> Option<&TensorType> {
    tensors.iter().find(|t| !computed(t.id))
}

/// The refusal of a file whose tensor `name` has GGML type number `id`.
pub(super) fn refusal(name: &str, id: u32) -> String {
    let ty = type_name(id).map_or_else(|| format!("GGML type {id}"), str::to_owned);
    format!("tensor `{name}` is {ty}, a type rbee does not compute (it computes {COMPUTED})")
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use candle_core::Device;
    use model_gen::{GgufType, ModelFormat, ModelSpec};

    use super::*;

    /// A file with one tensor of a type rbee does not compute is refused with the tensor and
    /// the type named, whether candle's header reader knows the type (Q8_K, Q8_1) or not (IQ
    /// types, a number nothing defines).
    #[test]
    fn a_tensor_of_a_type_rbee_does_not_compute_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q4_0.gguf");
        let format = ModelFormat::Gguf(GgufType::Q4_0);
        model_gen::write_model(&ModelSpec::tiny(), format, &path).unwrap();
        let tensors = tensor_types(&mut File::open(&path).unwrap()).unwrap();
        assert!(
            tensors
                .iter()
                .any(|t| t.name == "blk.0.attn_q.weight" && t.id == 2)
        );
        assert!(first_uncomputed(&tensors).is_none());
        let target = tensors
            .iter()
            .find(|t| t.name == "blk.1.ffn_up.weight")
            .unwrap();
        // IQ4_NL's blocks have Q4_0's size (an f16 scale and 16 bytes of 4-bit indices), so
        // that patched file is a well-formed IQ4_NL file.
        let cases = [
            (20, "IQ4_NL"),
            (16, "IQ2_XXS"),
            (34, "TQ1_0"),
            (15, "Q8_K"),
            (9, "Q8_1"),
            (99, "GGML type 99"),
        ];
        for (id, name) in cases {
            let mut bytes = std::fs::read(&path).unwrap();
            let at = target.at as usize;
            bytes[at..at + 4].copy_from_slice(&u32::to_le_bytes(id));
            let patched = dir.path().join(format!("{id}.gguf"));
            std::fs::write(&patched, bytes).unwrap();
            let err = super::super::load(&patched, &Device::Cpu, None, &mut |_| {})
                .err()
                .expect("refused")
                .to_string();
            let want = format!("tensor `blk.1.ffn_up.weight` is {name}, a type rbee does not");
            assert!(err.contains(&want), "{err}");
        }
    }

    /// A header that claims a tensor name of an exabyte is an error, not an allocation of it.
    #[test]
    fn a_huge_name_length_is_an_error() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"GGUF");
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes()); // tensors
        bytes.extend_from_slice(&0u64.to_le_bytes()); // metadata entries
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes()); // the name's length
        let err = tensor_types(&mut std::io::Cursor::new(bytes)).unwrap_err();
        assert!(err.to_string().contains("a tensor name of"), "{err}");
    }

    /// Every file model-gen writes the way llama.cpp's presets do (Q2_K, Q3_K_M, Q4_K_M,
    /// Q5_K_M, …, each with its mix of types) runs on the engine's path, batched; Q8_1 files are
    /// refused by name.
    #[test]
    fn every_preset_type_runs_on_the_engine_path() {
        let dir = tempfile::tempdir().unwrap();
        for ty in GgufType::ALL {
            let path = dir.path().join(format!("{ty}.gguf"));
            model_gen::write_model(&ModelSpec::small(), ModelFormat::Gguf(ty), &path).unwrap();
            // The path on whatever `RBEE_CPU_KERNELS` says in the test's environment.
            let result = super::super::load_with(&path, &Device::Cpu, None, true, &mut |_| {});
            if ty == GgufType::Q8_1 {
                let err = result.err().expect("refused").to_string();
                assert!(
                    err.contains("is Q8_1, a type rbee does not compute"),
                    "{err}"
                );
                continue;
            }
            let mut loaded = result.unwrap_or_else(|e| panic!("{ty}: {e}"));
            assert!(
                loaded.model.prefix_cache().is_some(),
                "{ty} runs on candle's path"
            );
        }
    }
}
