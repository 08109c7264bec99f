//! The header reader against files model-gen writes (compared with candle's reader of the same
//! files), against every truncation of a real header, and against hostile headers: each is an
//! error with a reason, never a panic or an allocation of what the header claims.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use gguf_info::{Array, GgmlType, Header, Value};
use model_gen::{Arch, GgufType, ModelFormat, ModelSpec};

fn generated(spec: &ModelSpec, ty: GgufType, dir: &Path) -> PathBuf {
    model_gen::ensure_generated(spec, ModelFormat::Gguf(ty), dir).unwrap()
}

/// candle's value, as this crate's.
fn from_candle(v: &gguf_file::Value) -> Value {
    use gguf_file::Value as C;
    match v {
        C::U8(x) => Value::U8(*x),
        C::I8(x) => Value::I8(*x),
        C::U16(x) => Value::U16(*x),
        C::I16(x) => Value::I16(*x),
        C::U32(x) => Value::U32(*x),
        C::I32(x) => Value::I32(*x),
        C::U64(x) => Value::U64(*x),
        C::I64(x) => Value::I64(*x),
        C::F32(x) => Value::F32(*x),
        C::F64(x) => Value::F64(*x),
        C::Bool(x) => Value::Bool(*x),
        C::String(x) => Value::String(x.clone()),
        C::Array(items) => {
            let all = |f: fn(&gguf_file::Value) -> Option<Value>| {
                items.iter().map(f).collect::<Option<Vec<_>>>()
            };
            macro_rules! typed {
                ($variant:ident) => {
                    all(|v| Some(from_candle(v))).map(|vs| {
                        Array::$variant(
                            vs.into_iter()
                                .map(|v| match v {
                                    Value::$variant(x) => x,
                                    other => panic!("mixed array: {other:?}"),
                                })
                                .collect(),
                        )
                    })
                };
            }
            let array = match items.first() {
                None => Some(Array::U8(Vec::new())),
                Some(C::U8(_)) => typed!(U8),
                Some(C::I8(_)) => typed!(I8),
                Some(C::U16(_)) => typed!(U16),
                Some(C::I16(_)) => typed!(I16),
                Some(C::U32(_)) => typed!(U32),
                Some(C::I32(_)) => typed!(I32),
                Some(C::U64(_)) => typed!(U64),
                Some(C::I64(_)) => typed!(I64),
                Some(C::F32(_)) => typed!(F32),
                Some(C::F64(_)) => typed!(F64),
                Some(C::Bool(_)) => typed!(Bool),
                Some(C::String(_)) => typed!(String),
                Some(C::Array(_)) => panic!("an array of arrays"),
            };
            Value::Array(array.unwrap())
        }
    }
}

fn type_of(dtype: candle_core::quantized::GgmlDType) -> GgmlType {
    use candle_core::quantized::GgmlDType as D;
    match dtype {
        D::F32 => GgmlType::F32,
        D::F16 => GgmlType::F16,
        D::BF16 => GgmlType::BF16,
        D::Q4_0 => GgmlType::Q4_0,
        D::Q4_1 => GgmlType::Q4_1,
        D::Q5_0 => GgmlType::Q5_0,
        D::Q5_1 => GgmlType::Q5_1,
        D::Q8_0 => GgmlType::Q8_0,
        D::Q8_1 => GgmlType::Q8_1,
        D::Q2K => GgmlType::Q2_K,
        D::Q3K => GgmlType::Q3_K,
        D::Q4K => GgmlType::Q4_K,
        D::Q5K => GgmlType::Q5_K,
        D::Q6K => GgmlType::Q6_K,
        D::Q8K => GgmlType::Q8_K,
    }
}

/// Every metadata pair and tensor description reads as candle reads it, and the data section
/// starts where candle's does, for files of every architecture and several types.
#[test]
fn model_gen_files_read_as_candle_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        generated(&ModelSpec::tiny(), GgufType::F32, dir.path()),
        generated(&ModelSpec::tiny(), GgufType::Q4KM, dir.path()),
        generated(&ModelSpec::tiny(), GgufType::Q5_0, dir.path()),
        generated(&ModelSpec::tiny_qwen2(), GgufType::Q8_0, dir.path()),
        generated(
            &ModelSpec::tiny_arch(Arch::Gemma3),
            GgufType::BF16,
            dir.path(),
        ),
        generated(&ModelSpec::tiny_arch(Arch::Phi3), GgufType::F16, dir.path()),
    ];
    for path in files {
        let header = Header::open(&path).unwrap();
        let candle = gguf_file::Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(header.version, 3);
        assert_eq!(header.data_offset, candle.tensor_data_offset, "{path:?}");
        assert_eq!(header.metadata.len(), candle.metadata.len());
        for (key, value) in &candle.metadata {
            // Empty arrays have no item type in candle's value; compare their lengths.
            match (header.get(key), value) {
                (Some(Value::Array(a)), gguf_file::Value::Array(c)) if c.is_empty() => {
                    assert!(a.is_empty(), "{key}")
                }
                (ours, _) => assert_eq!(ours, Some(&from_candle(value)), "{key}"),
            }
        }
        assert_eq!(header.tensors().len(), candle.tensor_infos.len());
        for t in header.tensors() {
            let c = &candle.tensor_infos[&t.name];
            let mut dims: Vec<u64> = c.shape.dims().iter().map(|&d| d as u64).collect();
            dims.reverse();
            assert_eq!(t.dims, dims, "{}", t.name);
            assert_eq!(t.ty, type_of(c.ggml_dtype), "{}", t.name);
            assert_eq!(t.offset, c.offset, "{}", t.name);
            let bytes = c.shape.elem_count() / c.ggml_dtype.block_size() * c.ggml_dtype.type_size();
            assert_eq!(t.bytes(), Some(bytes as u64), "{}", t.name);
            assert_eq!(header.tensor(&t.name), Some(t));
        }
        let data = std::fs::metadata(&path).unwrap().len() - header.data_offset;
        assert!(header.tensor_bytes() <= data);
    }
}

/// A file cut anywhere inside its header is an error naming where it ends, never a panic.
#[test]
fn every_truncated_header_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = generated(&ModelSpec::tiny(), GgufType::Q8_0, dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let header = Header::open(&path).unwrap();
    let end = header.data_offset as usize;
    // Every cut in the first and last 4 KiB of the header (the counts, the first pairs, the
    // tensor descriptions), and a thousand spread over the rest.
    let cuts = (0..4096.min(end))
        .chain((end.saturating_sub(4096)..end).rev())
        .chain((0..1000).map(|i| i * end / 1000));
    for cut in cuts {
        let err = Header::read(&mut Cursor::new(&bytes[..cut])).unwrap_err();
        assert!(!err.0.is_empty(), "cut at {cut}");
    }
    // Cut inside the data: the header reads, but a tensor's data runs past the end.
    let err = Header::read(&mut Cursor::new(&bytes[..end + 16])).unwrap_err();
    assert!(err.0.contains("runs past the end of the file"), "{err}");
}

/// A GGUF v3 header written value by value, for hostile cases.
struct Builder(Vec<u8>);

impl Builder {
    fn new(tensors: u64, pairs: u64) -> Self {
        let mut b = Builder(Vec::new());
        b.0.extend_from_slice(b"GGUF");
        b.u32(3).u64(tensors).u64(pairs);
        b
    }
    fn u32(&mut self, n: u32) -> &mut Self {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }
    fn u64(&mut self, n: u64) -> &mut Self {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// A tensor description: name, dims (ggml order), type, offset.
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    fn padded(&mut self, bytes: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(32) {
            self.0.push(0);
        }
        self.0.resize(self.0.len() + bytes, 0);
        self
    }
    fn read(&self) -> Result<Header, gguf_info::HeaderError> {
        Header::read(&mut Cursor::new(&self.0))
    }
    fn refused(&self, why: &str) {
        let err = self.read().unwrap_err().0;
        assert!(err.contains(why), "{err:?} should say {why:?}");
    }
}

#[test]
fn a_small_header_of_every_value_type_reads() {
    let mut b = Builder::new(1, 14);
    b.str("u8").u32(0).0.push(7);
    b.str("i8").u32(1).0.push(0xff);
    b.str("u16").u32(2).0.extend_from_slice(&9u16.to_le_bytes());
    b.str("i16")
        .u32(3)
        .0
        .extend_from_slice(&(-9i16).to_le_bytes());
    b.str("u32").u32(4).u32(10);
    b.str("i32")
        .u32(5)
        .0
        .extend_from_slice(&(-10i32).to_le_bytes());
    b.str("f32")
        .u32(6)
        .0
        .extend_from_slice(&1.5f32.to_le_bytes());
    b.str("bool").u32(7).0.push(1);
    b.str("string").u32(8).str("hé");
    b.str("u64").u32(10).u64(1 << 40);
    b.str("i64").u32(11).u64(u64::MAX);
    b.str("f64")
        .u32(12)
        .0
        .extend_from_slice(&2.5f64.to_le_bytes());
    b.str("strings").u32(9).u32(8).u64(2).str("a").str("bc");
    b.str("general.alignment").u32(4).u32(64);
    b.tensor("w", &[64, 2], 0, 0).padded(0);
    while !b.0.len().is_multiple_of(64) {
        b.0.push(0);
    }
    let data_offset = b.0.len() as u64;
    b.0.resize(b.0.len() + 64 * 2 * 4, 0);
    let h = b.read().unwrap();
    let want: HashMap<&str, Value> = [
        ("u8", Value::U8(7)),
        ("i8", Value::I8(-1)),
        ("u16", Value::U16(9)),
        ("i16", Value::I16(-9)),
        ("u32", Value::U32(10)),
        ("i32", Value::I32(-10)),
        ("f32", Value::F32(1.5)),
        ("bool", Value::Bool(true)),
        ("string", Value::String("hé".into())),
        ("u64", Value::U64(1 << 40)),
        ("i64", Value::I64(-1)),
        ("f64", Value::F64(2.5)),
        (
            "strings",
            Value::Array(Array::String(vec!["a".into(), "bc".into()])),
        ),
        ("general.alignment", Value::U32(64)),
    ]
    .into_iter()
    .collect();
    for (key, value) in want {
        assert_eq!(h.get(key), Some(&value), "{key}");
    }
    assert_eq!(h.count("i32"), None);
    assert_eq!(h.count("u16"), Some(9));
    assert_eq!(h.alignment, 64);
    assert_eq!(h.data_offset, data_offset);
    let w = h.tensor("w").unwrap();
    assert_eq!((w.matrix(), w.bytes()), (Some((2, 64)), Some(512)));
}

/// Lengths and counts beyond what the file holds are refused before anything is allocated for
/// them (an allocation of what these claim would abort the test).
#[test]
fn hostile_lengths_and_counts_are_errors_not_allocations() {
    // Each case is followed by some bytes, so that it is the claim that is refused, not the
    // file's end.
    let refused = |b: &mut Builder, why: &str| {
        b.0.resize(b.0.len() + 256, 0);
        b.refused(why);
    };
    refused(
        Builder::new(0, 1).u64(1 << 29),
        "runs past the end of the file",
    );
    refused(Builder::new(0, 1).u64(u64::MAX), "at most");
    refused(
        &mut Builder::new(1 << 58, 0),
        "tensors, more than the file holds",
    );
    refused(
        &mut Builder::new(0, 1 << 58),
        "metadata pairs, more than the file holds",
    );
    refused(
        Builder::new(0, 1).str("big").u32(8).u64(1 << 29),
        "runs past the end of the file",
    );
    refused(
        Builder::new(0, 1).str("bytes").u32(9).u32(0).u64(1 << 29),
        "more than the file's remaining",
    );
    refused(
        Builder::new(0, 1).str("strings").u32(9).u32(8).u64(1 << 29),
        "more than the file's remaining",
    );
    refused(
        Builder::new(0, 1)
            .str("many")
            .u32(9)
            .u32(4)
            .u64(u64::MAX / 2),
        "at most",
    );
    refused(Builder::new(1, 0).u64(1 << 60), "a tensor name of");
}

#[test]
fn malformed_headers_are_errors_with_a_reason() {
    let mut b = Builder::new(0, 0);
    b.0[..4].copy_from_slice(b"GGML");
    b.refused("GGUF magic");
    for version in [1, 4, 0x0300_0000] {
        let mut b = Builder::new(0, 0);
        b.0[4..8].copy_from_slice(&u32::to_le_bytes(version));
        b.refused("rbee reads versions 2 and 3");
    }
    let mut b = Builder::new(0, 1);
    b.str("x").u32(13).u32(0);
    b.refused("value type 13");
    let mut b = Builder::new(0, 1);
    b.str("nested").u32(9).u32(9).u64(1).u32(0).u64(0);
    b.refused("array of arrays");
    let mut b = Builder::new(0, 1);
    b.str("").u32(4).u32(0);
    b.refused("empty key");
    let mut b = Builder::new(0, 2);
    b.str("k").u32(4).u32(0).str("k").u32(4).u32(1);
    b.refused("appears twice");
    for alignment in [0u32, 48] {
        let mut b = Builder::new(0, 1);
        b.str("general.alignment").u32(4).u32(alignment);
        b.refused("power of two");
    }
    let mut b = Builder::new(0, 1);
    b.str("general.alignment").u32(10).u64(32);
    b.refused("power of two");

    let tensor = |name: &str, dims: &[u64], ty: u32, offset: u64, data: usize| {
        let mut b = Builder::new(1, 0);
        b.tensor(name, dims, ty, offset).padded(data);
        b
    };
    tensor(&"n".repeat(64), &[4], 0, 0, 16).refused("a tensor name of 64 bytes");
    tensor("t", &[1, 1, 1, 1, 1], 0, 0, 16).refused("5 dimensions");
    tensor("t", &[1 << 32, 1 << 32], 0, 0, 16).refused("more elements than ggml can count");
    tensor("t", &[33, 2], 2, 0, 1024).refused("not a multiple of Q4_0's block of 32");
    tensor("t", &[4], 0, 8, 64).refused("not a multiple of the alignment");
    tensor("t", &[1024, 1024], 0, 0, 64).refused("runs past the end of the file");
    tensor("t", &[4], 0, u64::MAX - 31, 64).refused("runs past the end of the file");
    let mut b = Builder::new(2, 0);
    b.tensor("t", &[4], 0, 0)
        .tensor("t", &[4], 0, 32)
        .padded(64);
    b.refused("appears twice");
    // A type nothing defines reads, so that the refusal can name it.
    let h = tensor("t", &[4], 99, 0, 64).read().unwrap();
    assert_eq!(h.tensor("t").unwrap().ty, GgmlType(99));
    assert_eq!(
        gguf_info::uncomputed_tensor(&h).unwrap(),
        format!(
            "tensor `t` is GGML type 99, a type rbee does not compute (it computes {})",
            gguf_info::COMPUTED
        )
    );
}

/// Sizes are computed as llama.cpp checks them: a dimension above `i64::MAX` is negative to
/// ggml whatever the others are, a tensor whose bytes do not fit a `u64` is refused (its
/// elements fit, four bytes each do not), and a tensor without dimensions is one element,
/// which a quantized block does not divide.
#[test]
fn sizes_that_overflow_or_that_ggml_reads_as_negative_are_refused() {
    let tensor = |dims: &[u64], ty: u32| {
        let mut b = Builder::new(1, 0);
        b.tensor("t", dims, ty, 0).padded(64);
        b
    };
    tensor(&[1 << 62], 0).refused("a size in bytes that 64 bits do not hold");
    tensor(&[1 << 62, 2], 1).refused("more elements than ggml can count");
    tensor(&[0, u64::MAX], 0).refused("dimension");
    tensor(&[u64::MAX, 0], 0).refused("dimension");
    tensor(&[], 2).refused("not a multiple of Q4_0's block of 32");
    let h = tensor(&[], 0).read().unwrap();
    assert_eq!(h.tensor("t").unwrap().bytes(), Some(4));
}

/// Head counts no product of which fits a `usize` are a reason, not an overflow.
#[test]
fn a_head_count_whose_products_overflow_is_refused_by_the_rules() {
    let mut b = Builder::new(1, 8);
    b.str("general.architecture").u32(8).str("llama");
    b.str("llama.block_count").u32(10).u64(1);
    b.str("llama.embedding_length").u32(10).u64(64);
    b.str("llama.attention.head_count").u32(10).u64(1 << 60);
    b.str("llama.attention.head_count_kv").u32(10).u64(1 << 60);
    b.str("llama.attention.key_length").u32(10).u64(64);
    b.str("llama.attention.value_length").u32(10).u64(64);
    b.str("llama.attention.layer_norm_rms_epsilon")
        .u32(6)
        .0
        .extend_from_slice(&1e-5f32.to_le_bytes());
    b.tensor("token_embd.weight", &[64, 4], 0, 0)
        .padded(64 * 4 * 4);
    let h = b.read().unwrap();
    assert!(!gguf_info::runs_on_cpu_path(&h));
    let why = gguf_info::cpu_path::Layout::read(&h, 4096).unwrap_err().0;
    assert!(why.contains("attention shape"), "{why}");
}
