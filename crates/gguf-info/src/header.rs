//! A GGUF file's header: its metadata and the description of each tensor, read without reading
//! the tensors' data.
//!
//! The layout and the limits are llama.cpp's (`ggml/src/gguf.cpp`): the magic `GGUF`, version 2
//! or 3 (version 1 had 32-bit lengths and went out of use in 2023), little-endian counts of
//! tensors and metadata pairs, the pairs (a key, a value type, a value; an array is an item type,
//! a count and the items, never an array of arrays), then each tensor's name, dimensions, GGML
//! type and offset in the data section, which starts at the next multiple of
//! `general.alignment` (32 when absent).
//!
//! Every length and count in a header comes from the file, so each is checked against the bytes
//! the file has left before anything is allocated for it: a hostile header is an error, never an
//! allocation of what it claims. What is kept in memory is a few times the header's own size at
//! most (an array of strings holds a `String` per item).

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::types::GgmlType;

/// The alignment of the data section when `general.alignment` does not set one.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// llama.cpp's limits on one string and one array of a header.
pub const MAX_STRING_BYTES: u64 = 1 << 30;
pub const MAX_ARRAY_ITEMS: u64 = 1 << 30;
/// ggml's `GGML_MAX_NAME`: a tensor's name is shorter.
pub const MAX_TENSOR_NAME_BYTES: u64 = 64;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;

/// Why a header could not be read: one line, naming what in the file is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError(pub String);

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HeaderError {}

fn error(message: impl Into<String>) -> HeaderError {
    HeaderError(message.into())
}

impl From<io::Error> for HeaderError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            error("the file ends inside its GGUF header")
        } else {
            error(format!("reading the GGUF header: {e}"))
        }
    }
}

/// A metadata value, of one of GGUF's value types.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// An array value: items of one type, held as that type.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items as flags: an array of bools, or of integers read as non-zero.
    pub fn to_bools(&self) -> Option<Vec<bool>> {
        fn nonzero<T: Copy + Default + PartialEq>(v: &[T]) -> Vec<bool> {
            v.iter().map(|&x| x != T::default()).collect()
        }
        Some(match self {
            Array::Bool(v) => v.clone(),
            Array::U8(v) => nonzero(v),
            Array::I8(v) => nonzero(v),
            Array::U16(v) => nonzero(v),
            Array::I16(v) => nonzero(v),
            Array::U32(v) => nonzero(v),
            Array::I32(v) => nonzero(v),
            Array::U64(v) => nonzero(v),
            Array::I64(v) => nonzero(v),
            _ => return None,
        })
    }
}

impl Value {
    /// The value as a count: an unsigned integer, or a signed one that is not negative.
    pub fn to_count(&self) -> Option<u64> {
        match *self {
            Value::U8(n) => Some(u64::from(n)),
            Value::U16(n) => Some(u64::from(n)),
            Value::U32(n) => Some(u64::from(n)),
            Value::U64(n) => Some(n),
            Value::I8(n) => u64::try_from(n).ok(),
            Value::I16(n) => u64::try_from(n).ok(),
            Value::I32(n) => u64::try_from(n).ok(),
            Value::I64(n) => u64::try_from(n).ok(),
            _ => None,
        }
    }

    /// The value as a number: a float, or an integer converted.
    pub fn to_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(x) => Some(x),
            Value::F64(x) => Some(x as f32),
            Value::U8(n) => Some(f32::from(n)),
            Value::I8(n) => Some(f32::from(n)),
            Value::U16(n) => Some(f32::from(n)),
            Value::I16(n) => Some(f32::from(n)),
            Value::U32(n) => Some(n as f32),
            Value::I32(n) => Some(n as f32),
            Value::U64(n) => Some(n as f32),
            Value::I64(n) => Some(n as f32),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's description in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Elements along each dimension in GGML's order: `dims[0]` is the length of a row (the
    /// innermost, contiguous dimension), `dims[1]` the number of rows of a matrix.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Where its data starts, from the start of the data section.
    pub offset: u64,
    /// Where in the file its type number is stored (tests patch it to make files of other
    /// types).
    pub type_position: u64,
}

impl TensorInfo {
    /// Elements in the tensor (checked at read not to overflow).
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of its data, when its type's block size is known (checked at read to fit; one
    /// made otherwise counts `u64::MAX` rather than wrap).
    pub fn bytes(&self) -> Option<u64> {
        let (elems, bytes) = self.ty.block()?;
        Some((self.elements() / elems).saturating_mul(bytes))
    }

    /// Rows and columns of a 2-D tensor (a matrix of `rows` rows of `cols` elements).
    pub fn matrix(&self) -> Option<(u64, u64)> {
        match self.dims[..] {
            [cols, rows] => Some((rows, cols)),
            _ => None,
        }
    }
}

/// A GGUF file's header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    /// Every metadata pair (keys are unique: a repeated key is an error, as in llama.cpp).
    pub metadata: HashMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    /// The data section's alignment (`general.alignment`, a power of two).
    pub alignment: u64,
    /// Where in the file the data section starts.
    pub data_offset: u64,
}

/// A reader that knows how many bytes the file has left, so that no length read from it is
/// trusted beyond them.
struct Bounded<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Bounded<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn exact<const N: usize>(&mut self) -> Result<[u8; N], HeaderError> {
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, HeaderError> {
        Ok(u32::from_le_bytes(self.exact()?))
    }

    fn u64(&mut self) -> Result<u64, HeaderError> {
        Ok(u64::from_le_bytes(self.exact()?))
    }

    /// `len` bytes, once the file is known to hold them.
    fn bytes(&mut self, len: u64, what: &str) -> Result<Vec<u8>, HeaderError> {
        if len > self.remaining() {
            return Err(error(format!(
                "{what} of {len} bytes runs past the end of the file ({} bytes left)",
                self.remaining()
            )));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf)?;
        self.pos += len;
        Ok(buf)
    }

    fn string(&mut self, what: &str) -> Result<String, HeaderError> {
        let len = self.u64()?;
        if len > MAX_STRING_BYTES {
            return Err(error(format!(
                "{what} of {len} bytes (at most {MAX_STRING_BYTES})"
            )));
        }
        let bytes = self.bytes(len, what)?;
        Ok(String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    /// `count` items of `size` bytes each, once the file is known to hold them.
    fn items<T, const N: usize>(
        &mut self,
        count: u64,
        key: &str,
        item: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, HeaderError> {
        self.check_items(count, N as u64, key)?;
        let raw = self.bytes(count * N as u64, key)?;
        Ok(raw
            .chunks_exact(N)
            .map(|c| item(c.try_into().expect("chunks of N bytes")))
            .collect())
    }

    fn check_items(&self, count: u64, min_size: u64, key: &str) -> Result<(), HeaderError> {
        if count > MAX_ARRAY_ITEMS {
            return Err(error(format!(
                "metadata `{key}` is an array of {count} items (at most {MAX_ARRAY_ITEMS})"
            )));
        }
        if count.saturating_mul(min_size) > self.remaining() {
            return Err(error(format!(
                "metadata `{key}` is an array of {count} items, more than the file's remaining {} \
                 bytes hold",
                self.remaining()
            )));
        }
        Ok(())
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<Value, HeaderError> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.exact()?)),
            1 => Value::I8(i8::from_le_bytes(self.exact()?)),
            2 => Value::U16(u16::from_le_bytes(self.exact()?)),
            3 => Value::I16(i16::from_le_bytes(self.exact()?)),
            4 => Value::U32(u32::from_le_bytes(self.exact()?)),
            5 => Value::I32(i32::from_le_bytes(self.exact()?)),
            6 => Value::F32(f32::from_le_bytes(self.exact()?)),
            7 => Value::Bool(self.exact::<1>()?[0] != 0),
            8 => Value::String(self.string(&format!("metadata `{key}`"))?),
            9 => Value::Array(self.array(key)?),
            10 => Value::U64(u64::from_le_bytes(self.exact()?)),
            11 => Value::I64(i64::from_le_bytes(self.exact()?)),
            12 => Value::F64(f64::from_le_bytes(self.exact()?)),
            _ => {
                return Err(error(format!(
                    "metadata `{key}` has value type {ty}, which GGUF does not define"
                )));
            }
        })
    }

    fn array(&mut self, key: &str) -> Result<Array, HeaderError> {
        let ty = self.u32()?;
        let n = self.u64()?;
        Ok(match ty {
            0 => Array::U8(self.items(n, key, u8::from_le_bytes)?),
            1 => Array::I8(self.items(n, key, i8::from_le_bytes)?),
            2 => Array::U16(self.items(n, key, u16::from_le_bytes)?),
            3 => Array::I16(self.items(n, key, i16::from_le_bytes)?),
            4 => Array::U32(self.items(n, key, u32::from_le_bytes)?),
            5 => Array::I32(self.items(n, key, i32::from_le_bytes)?),
            6 => Array::F32(self.items(n, key, f32::from_le_bytes)?),
            7 => Array::Bool(self.items(n, key, |[b]: [u8; 1]| b != 0)?),
            8 => {
                // Each string takes at least its 8-byte length.
                self.check_items(n, 8, key)?;
                let what = format!("a string of metadata `{key}`");
                let strings = (0..n)
                    .map(|_| self.string(&what))
                    .collect::<Result<_, _>>()?;
                Array::String(strings)
            }
            10 => Array::U64(self.items(n, key, u64::from_le_bytes)?),
            11 => Array::I64(self.items(n, key, i64::from_le_bytes)?),
            12 => Array::F64(self.items(n, key, f64::from_le_bytes)?),
            9 => {
                return Err(error(format!(
                    "metadata `{key}` is an array of arrays, which GGUF does not allow"
                )));
            }
            _ => {
                return Err(error(format!(
                    "metadata `{key}` is an array of value type {ty}, which GGUF does not define"
                )));
            }
        })
    }
}

/// Smallest bytes one metadata pair takes (an empty key is refused, so at least one byte of
/// key, its length, and the value type), and one tensor description (a one-byte name and its
/// length, the dimension count, the type and the offset).
const MIN_PAIR_BYTES: u64 = 8 + 1 + 4;
const MIN_TENSOR_BYTES: u64 = 8 + 1 + 4 + 4 + 8;

impl Header {
    /// Reads the header of the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Header, HeaderError> {
        let file = File::open(path).map_err(|e| error(format!("cannot open it: {e}")))?;
        Header::read(&mut BufReader::new(file))
    }

    /// Reads the header from the start of `r`, leaving `r` wherever the header ends.
    pub fn read<R: Read + Seek>(r: &mut R) -> Result<Header, HeaderError> {
        let len = r.seek(SeekFrom::End(0))?;
        r.seek(SeekFrom::Start(0))?;
        let mut r = Bounded {
            inner: r,
            pos: 0,
            len,
        };
        let magic: [u8; 4] = r.exact()?;
        if &magic != b"GGUF" {
            return Err(error("it does not start with the GGUF magic"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(error(format!(
                "GGUF version {version} (rbee reads versions 2 and 3)"
            )));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        if n_kv.saturating_mul(MIN_PAIR_BYTES) > r.remaining() {
            return Err(error(format!(
                "the header claims {n_kv} metadata pairs, more than the file holds"
            )));
        }
        if n_tensors.saturating_mul(MIN_TENSOR_BYTES) > r.remaining() {
            return Err(error(format!(
                "the header claims {n_tensors} tensors, more than the file holds"
            )));
        }

        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            let key = r.string("a metadata key")?;
            if key.is_empty() {
                return Err(error(format!("metadata pair {i} has an empty key")));
            }
            let ty = r.u32()?;
            let value = r.value(ty, &key)?;
            if metadata.contains_key(&key) {
                return Err(error(format!("metadata `{key}` appears twice")));
            }
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(n)) if n.is_power_of_two() => u64::from(*n),
            Some(other) => {
                return Err(error(format!(
                    "general.alignment is {other:?}, not a power of two of type u32"
                )));
            }
        };

        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        for _ in 0..n_tensors {
            let name_len = r.u64()?;
            if name_len >= MAX_TENSOR_NAME_BYTES {
                return Err(error(format!(
                    "a tensor name of {name_len} bytes (ggml's names are shorter than \
                     {MAX_TENSOR_NAME_BYTES})"
                )));
            }
            let name = r.bytes(name_len, "a tensor name")?;
            let name = String::from_utf8_lossy(&name).into_owned();
            let n_dims = r.u32()?;
            if n_dims > MAX_DIMS {
                return Err(error(format!(
                    "tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            let mut elements: u64 = 1;
            for j in 0..n_dims {
                let d = r.u64()?;
                // ggml's dimensions are `int64_t`: a larger one is negative to it, even beside
                // a zero that keeps the product small.
                if i64::try_from(d).is_err() {
                    return Err(error(format!(
                        "tensor `{name}` has dimension {j} of {d} elements (ggml counts at most \
                         {})",
                        i64::MAX
                    )));
                }
                elements = elements
                    .checked_mul(d)
                    .filter(|&n| i64::try_from(n).is_ok())
                    .ok_or_else(|| {
                        error(format!(
                            "tensor `{name}` has more elements than ggml can count"
                        ))
                    })?;
                dims.push(d);
            }
            let type_position = r.pos;
            let ty = GgmlType(r.u32()?);
            // A tensor without dimensions is one element, as ggml sets its missing ones to 1.
            let row = dims.first().copied().unwrap_or(1);
            if let Some((block, block_bytes)) = ty.block() {
                if row % block != 0 {
                    return Err(error(format!(
                        "tensor `{name}` has rows of {row} elements, not a multiple of {}'s \
                         block of {block}",
                        ty.name().unwrap_or("its type")
                    )));
                }
                if (elements / block).checked_mul(block_bytes).is_none() {
                    return Err(error(format!(
                        "tensor `{name}` has a size in bytes that 64 bits do not hold"
                    )));
                }
            }
            let offset = r.u64()?;
            if offset % alignment != 0 {
                return Err(error(format!(
                    "tensor `{name}`'s data is at offset {offset}, not a multiple of the \
                     alignment {alignment}"
                )));
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(error(format!("tensor `{name}` appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                type_position,
            });
        }
        let data_offset = r.pos.next_multiple_of(alignment);
        // Every tensor lies inside the file: a reader of the data section may size its buffer
        // by the tensors' ends.
        let data_len = len.saturating_sub(data_offset);
        for t in &tensors {
            if let Some(bytes) = t.bytes()
                && t.offset.checked_add(bytes).is_none_or(|end| end > data_len)
            {
                return Err(error(format!(
                    "tensor `{}`'s data ({bytes} bytes at offset {}) runs past the end of the \
                     file",
                    t.name, t.offset
                )));
            }
        }
        Ok(Header {
            version,
            metadata,
            tensors,
            by_name,
            alignment,
            data_offset,
        })
    }

    /// The tensors, in the header's order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn count(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::to_count)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.str("general.architecture")
    }

    /// Bytes of all tensors' data, as stored (tensors of a type whose size is unknown count 0).
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .filter_map(TensorInfo::bytes)
            .fold(0, u64::saturating_add)
    }
}
