//! The weights of a llama-family GGUF file as the CPU forward pass reads them: the file's tensor
//! data read once into one buffer, and typed views (type, shape, offset) into it. Nothing is
//! dequantized or copied at load except the small norm vectors.

use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::{GgmlDType, gguf_file};
use gguf_info::GgmlType;
use gguf_info::cpu_path::TensorRef;

use super::kernels::Kernels;
use super::kernels::tiled::{self, TILE_ROWS};
use super::kernels::tiled_k;
use super::quant::{WeightType, dequantize_row};
use crate::EngineError;

/// A 2-D weight matrix inside the tensor data: `rows` rows of `cols` elements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mat {
    pub ty: WeightType,
    pub rows: usize,
    pub cols: usize,
    /// Repacked into eight-row tiles ([`tiled`], [`tiled_k`]): read with [`Mat::tile_at`], not
    /// [`Mat::row`].
    pub tiled: bool,
    offset: usize,
    row_bytes: usize,
}

impl Mat {
    #[inline]
    pub(crate) fn row<'a>(&self, data: &'a [u8], r: usize) -> &'a [u8] {
        debug_assert!(!self.tiled);
        let start = self.offset + r * self.row_bytes;
        &data[start..start + self.row_bytes]
    }

    /// Tile `g` (rows `8g..8g + 8`) of a tiled matrix.
    #[inline]
    pub(crate) fn tile_at<'a>(&self, data: &'a [u8], g: usize) -> &'a [u8] {
        let len = TILE_ROWS * self.row_bytes;
        let start = self.offset + g * len;
        &data[start..start + len]
    }

    /// Whether `self` and `other` view the same tensor (an output tied to the embedding).
    pub(crate) fn same_tensor(&self, other: &Mat) -> bool {
        self.offset == other.offset
    }

    /// Repacks a Q4_0, Q5_0, Q8_0, Q4_K, Q5_K or Q6_K matrix (F16 and BF16 stay as they are) whose row count is a multiple of eight into tiles,
    /// in place in `data`, when `kernels` multiply that type in tiles; any other matrix is left
    /// as it is.
    pub(crate) fn tile(&mut self, data: &mut [u8], kernels: &Kernels, scratch: &mut Vec<u8>) {
        if self.tiled || !kernels.tiles(self.ty) || !self.rows.is_multiple_of(TILE_ROWS) {
            return;
        }
        let len = TILE_ROWS * self.row_bytes;
        let blocks = self.cols / self.ty.block_elems();
        let all = &mut data[self.offset..self.offset + self.rows * self.row_bytes];
        for tile in all.chunks_exact_mut(len) {
            match self.ty {
                WeightType::Q8_0 => tiled::repack_q8_0(tile, blocks, scratch),
                WeightType::Q5_0 => tiled::repack_q5_0(tile, blocks, scratch),
                WeightType::Q4K => tiled_k::repack(tile, blocks, scratch),
                WeightType::Q5K => tiled_k::repack_q5k(tile, blocks, scratch),
                WeightType::Q6K => tiled_k::repack_q6k(tile, blocks, scratch),
                // A float tile is eight consecutive rows as they are.
                WeightType::F16 | WeightType::BF16 => {}
                _ => tiled::repack(tile, blocks, scratch),
            }
        }
        self.tiled = true;
    }
}

/// The GGML types the CPU path multiplies and dequantizes (matrices, embedding rows, norms):
/// every type gguf-info's rule lets onto the path.
fn weight_type(ty: GgmlType) -> Option<WeightType> {
    Some(match ty {
        GgmlType::F32 => WeightType::F32,
        GgmlType::F16 => WeightType::F16,
        GgmlType::BF16 => WeightType::BF16,
        GgmlType::Q4_0 => WeightType::Q4_0,
        GgmlType::Q4_1 => WeightType::Q4_1,
        GgmlType::Q5_0 => WeightType::Q5_0,
        GgmlType::Q5_1 => WeightType::Q5_1,
        GgmlType::Q8_0 => WeightType::Q8_0,
        GgmlType::Q2_K => WeightType::Q2K,
        GgmlType::Q3_K => WeightType::Q3K,
        GgmlType::Q4_K => WeightType::Q4K,
        GgmlType::Q5_K => WeightType::Q5K,
        GgmlType::Q6_K => WeightType::Q6K,
        _ => return None,
    })
}

fn weight_type_of(t: &TensorRef) -> Result<(WeightType, usize), Unsupported> {
    let ty = weight_type(t.ty)
        .ok_or_else(|| Unsupported(format!("{} has no kernel here", t.ty.describe())))?;
    let offset = usize::try_from(t.offset).map_err(|_| Unsupported("offset".into()))?;
    Ok((ty, offset))
}

impl Mat {
    /// The matrix gguf-info's layout describes (a type with a kernel, rows whole blocks).
    pub(crate) fn of(t: &TensorRef) -> Result<Mat, Unsupported> {
        let (ty, offset) = weight_type_of(t)?;
        Ok(Mat {
            ty,
            rows: t.rows,
            cols: t.cols,
            tiled: false,
            offset,
            row_bytes: ty.row_bytes(t.cols),
        })
    }
}

impl VecRef {
    /// The vector gguf-info's layout describes, dequantized to f32 once its bytes are loaded.
    pub(crate) fn of(t: &TensorRef) -> Result<VecRef, Unsupported> {
        let (ty, offset) = weight_type_of(t)?;
        Ok(VecRef {
            ty,
            len: t.cols,
            offset,
        })
    }
}

/// The tensor data region of one GGUF file.
pub(crate) struct Tensors<'a> {
    content: &'a gguf_file::Content,
}

impl<'a> Tensors<'a> {
    pub(crate) fn new(content: &'a gguf_file::Content) -> Self {
        Tensors { content }
    }

    /// Bytes of tensor data: the end of the last tensor.
    pub(crate) fn data_len(&self) -> u64 {
        self.content
            .tensor_infos
            .values()
            .map(|t| {
                let bytes =
                    t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size();
                t.offset + bytes as u64
            })
            .max()
            .unwrap_or(0)
    }

    pub(crate) fn data_offset(&self) -> u64 {
        self.content.tensor_data_offset
    }
}

/// A 1-D tensor not yet read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VecRef {
    ty: WeightType,
    len: usize,
    offset: usize,
}

impl VecRef {
    pub(crate) fn read(&self, data: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; self.len];
        let bytes = self.ty.row_bytes(self.len);
        dequantize_row(self.ty, &data[self.offset..self.offset + bytes], &mut out);
        out
    }
}

/// Why a file stays on candle's path; logged, never shown to a client.
pub(crate) use gguf_info::Unsupported;

/// Asks Linux to back the 2 MiB-aligned part of `buf` with huge pages, before its first touch.
/// A decode step streams every page of the weights; with 4 KiB pages that is one TLB miss per
/// 4 KiB. Where transparent huge pages are off or unavailable the request changes nothing.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn advise_huge_pages(buf: &mut [u8]) {
    use nix::sys::mman::{MmapAdvise, madvise};
    const HUGE: usize = 2 << 20;
    let start = buf.as_mut_ptr() as usize;
    let first = start.next_multiple_of(HUGE);
    let end = (start + buf.len()) / HUGE * HUGE;
    let Some(ptr) = std::ptr::NonNull::new(first as *mut std::ffi::c_void) else {
        return;
    };
    if end <= first {
        return;
    }
    // SAFETY: `first..end` lies inside `buf`, which this function borrows mutably, so no
    // other code uses the range meanwhile; MADV_HUGEPAGE changes how the kernel backs the
    // pages, never their contents.
    if let Err(err) = unsafe { madvise(ptr, end - first, MmapAdvise::MADV_HUGEPAGE) } {
        tracing::debug!(%err, "no huge pages for the weights");
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn advise_huge_pages(_buf: &mut [u8]) {}

/// Reads the whole tensor data region of the file in one buffer, calling `progress(read,
/// total)` as it goes.
pub(crate) fn read_data<R: Read + Seek>(
    reader: &mut R,
    tensors: &Tensors<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<u8>, EngineError> {
    let total = tensors.data_len();
    let len = usize::try_from(total)
        .map_err(|_| EngineError::Load("the weights do not fit in memory".into()))?;
    reader
        .seek(SeekFrom::Start(tensors.data_offset()))
        .map_err(|e| EngineError::load("weights", e))?;
    let mut data = vec![0u8; len];
    advise_huge_pages(&mut data);
    const STEP: usize = 8 << 20;
    let mut done = 0;
    while done < len {
        let end = len.min(done + STEP);
        reader
            .read_exact(&mut data[done..end])
            .map_err(|e| EngineError::load("weights", e))?;
        done = end;
        progress(done as u64, total);
    }
    Ok(data)
}

/// llama.cpp's names for the GGML types.
pub(crate) fn ggml_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}
