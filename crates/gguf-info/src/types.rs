//! GGML tensor types by their numbers in a GGUF header, with llama.cpp's names, and which of
//! them rbee computes.

use crate::header::Header;

/// A GGML type number (`ggml.h`'s `enum ggml_type`), as a header stores it; numbers nothing
/// defines are kept too, so that a refusal can name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q8_1: GgmlType = GgmlType(9);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const Q8_K: GgmlType = GgmlType(15);
    pub const BF16: GgmlType = GgmlType(30);

    /// llama.cpp's name for the type.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
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

    /// The name, or the number of a type without one.
    pub fn describe(self) -> String {
        self.name()
            .map_or_else(|| format!("GGML type {}", self.0), str::to_owned)
    }

    /// Elements per block and bytes per block (ggml's `blck_size` and `type_size`), for the
    /// types rbee computes; `None` for the others, whose files are refused (by name, so a header
    /// is read whatever their sizes) before their sizes matter.
    pub fn block(self) -> Option<(u64, u64)> {
        Some(match self.0 {
            0 => (1, 4),
            1 | 30 => (1, 2),
            2 => (32, 18),
            3 => (32, 20),
            6 => (32, 22),
            7 => (32, 24),
            8 => (32, 34),
            10 => (256, 84),
            11 => (256, 110),
            12 => (256, 144),
            13 => (256, 176),
            14 => (256, 210),
            _ => return None,
        })
    }

    /// Whether rbee computes tensors of this type: every type of llama.cpp's standard presets,
    /// each with a kernel on the engine's CPU path. Q8_1 and Q8_K are activation formats:
    /// candle's model code cannot load them as weights and llama.cpp has no product with them;
    /// the rest have no code in rbee.
    pub fn computed(self) -> bool {
        matches!(self.0, 0..=3 | 6..=8 | 10..=14 | 30)
    }
}

/// The types rbee computes, for the refusal of the others.
pub const COMPUTED: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, \
                            Q5_K and Q6_K";

/// The refusal of a file whose tensor `name` has type `ty`.
pub fn refusal(name: &str, ty: GgmlType) -> String {
    format!(
        "tensor `{name}` is {}, a type rbee does not compute (it computes {COMPUTED})",
        ty.describe()
    )
}

/// Why no code of rbee's computes the file: its first tensor (in the header's order) of a
/// type rbee does not compute, named with the type, as loading it refuses it. `None` when every
/// tensor's type is computed.
pub fn uncomputed_tensor(header: &Header) -> Option<String> {
    header
        .tensors()
        .iter()
        .find(|t| !t.ty.computed())
        .map(|t| refusal(&t.name, t.ty))
}
