//! Which tensors a model has, how they are initialised, and how llama.cpp's converter turns
//! the Hugging Face weights into GGUF ones (llama's q/k row permutation, Gemma's `1 + w`
//! norms, the generated RoPE factor tensors).

use crate::rng::SplitMix64;
use crate::spec::{Arch, ModelSpec};

/// The role of a tensor, which decides its initial scale and its dtype in quantized files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Embedding,
    /// The output head (absent when tied to the embedding).
    Output,
    Linear,
    /// An RMSNorm scale of the hidden state or of one head: all ones (Gemma: zeros in
    /// Hugging Face's `1 + w` form), always stored as F32.
    Norm,
    /// The RMSNorm before the output head, stored as F32.
    OutputNorm,
    /// A q/k/v bias (qwen2), always stored as F32.
    Bias,
    /// Per-dimension RoPE frequency divisors the converter generates (`rope_freqs`,
    /// `rope_factors_long`, `rope_factors_short`): GGUF only, F32.
    RopeFactors,
}

/// One tensor, named in both layouts. `shape` is `[rows, cols]` (PyTorch order: `[out, in]`)
/// or `[len]`.
#[derive(Debug, Clone)]
pub(crate) struct TensorDef {
    pub hf_name: String,
    pub gguf_name: String,
    pub shape: Vec<usize>,
    pub role: Role,
    /// For llama q/k projections: the head count whose rows llama.cpp interleaves in GGUF.
    pub gguf_rope_heads: Option<usize>,
}

impl TensorDef {
    fn new(hf: String, gguf: String, shape: Vec<usize>, role: Role) -> Self {
        Self {
            hf_name: hf,
            gguf_name: gguf,
            shape,
            role,
            gguf_rope_heads: None,
        }
    }

    pub(crate) fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row length: what quantization blocks are cut from.
    pub(crate) fn cols(&self) -> usize {
        *self
            .shape
            .last()
            .expect("tensors have at least one dimension")
    }

    /// Whether the tensor exists in Hugging Face layout (the RoPE factor tensors are made by
    /// the converter).
    pub(crate) fn in_hub(&self) -> bool {
        self.role != Role::RopeFactors
    }

    /// The values in Hugging Face layout. They depend only on the seed and the HF name.
    pub(crate) fn generate(&self, spec: &ModelSpec) -> Vec<f32> {
        let mut values = vec![0f32; self.elem_count()];
        // Gemma keeps `w` of a `1 + w` scale: its unit scale is 0.
        let norm_offset = if spec.arch.is_gemma() { 1.0 } else { 0.0 };
        let std = match self.role {
            Role::Norm => {
                values.fill(1.0 - norm_offset);
                return values;
            }
            // A tied head scores each token by its embedding's dot product with the final
            // state, which still contains the current token's embedding: untrained, it would
            // predict the current token forever. Random signs on the final norm decorrelate
            // the two; their magnitude sets the logits' spread.
            Role::OutputNorm if spec.tie_embeddings => {
                let magnitude =
                    spec.logit_std / (embedding_std(spec) * (spec.hidden as f32).sqrt());
                let mut rng = SplitMix64::for_tensor(spec.seed, &self.hf_name);
                values.iter_mut().for_each(|v| {
                    let sign = if rng.next_u64() >> 63 == 0 { 1.0 } else { -1.0 };
                    *v = sign * magnitude - norm_offset;
                });
                return values;
            }
            Role::OutputNorm => {
                values.fill(1.0 - norm_offset);
                return values;
            }
            Role::RopeFactors => return self.rope_factors(spec),
            Role::Embedding => embedding_std(spec),
            // Logits with a standard deviation of `logit_std` (6 and more) make the greedy
            // choice a wide margin decision: float reordering between loaders cannot flip
            // it, and even 4-bit quantization rarely does.
            Role::Output => spec.logit_std / (spec.hidden as f32).sqrt(),
            // Unit-variance inputs (after RMSNorm) give unit-variance outputs.
            Role::Linear => 1.0 / (self.cols() as f32).sqrt(),
            Role::Bias => 0.1,
        };
        // A uniform distribution on [-a, a) has standard deviation a / sqrt(3).
        let amplitude = std * 3f32.sqrt();
        SplitMix64::for_tensor(spec.seed, &self.hf_name).fill_uniform(&mut values, amplitude);
        let scores_tokens = match self.role {
            Role::Output => true,
            Role::Embedding => spec.tie_embeddings,
            _ => false,
        };
        if let Some(loud) = spec.loud_rows.filter(|_| scores_tokens) {
            // A stream of its own, so that the other values are those of a spec without
            // loud rows.
            let mut pick = SplitMix64::for_tensor(spec.seed, &format!("{}#loud", self.hf_name));
            for row in values.chunks_exact_mut(self.cols()) {
                if pick.next_u64().is_multiple_of(u64::from(loud.one_in)) {
                    row.iter_mut().for_each(|v| *v *= loud.scale);
                }
            }
        }
        values
    }

    fn rope_factors(&self, spec: &ModelSpec) -> Vec<f32> {
        let values = if self.gguf_name.starts_with("rope_freqs") {
            spec.llama3_rope_freqs()
        } else {
            let long = self.gguf_name.starts_with("rope_factors_long");
            spec.longrope_factors()
                .map(|(short, long_factors)| if long { long_factors } else { short })
        };
        values.expect("rope factor tensors exist only for specs with those factors")
    }

    /// The values in GGUF layout, as llama.cpp's converter writes them: llama's q/k rows
    /// permuted, Gemma's norms as `1 + w`.
    pub(crate) fn generate_gguf(&self, spec: &ModelSpec) -> Vec<f32> {
        let mut values = self.generate(spec);
        if spec.arch.is_gemma() && matches!(self.role, Role::Norm | Role::OutputNorm) {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        match self.gguf_rope_heads {
            Some(heads) => llama_cpp_permute(&values, self.shape[0], self.shape[1], heads),
            None => values,
        }
    }
}

/// The embedding's standard deviation. Gemma multiplies the embedding by `sqrt(hidden)`
/// before the first layer; dividing by it here starts its residual stream at unit scale like
/// the other families', so each layer's output moves it.
fn embedding_std(spec: &ModelSpec) -> f32 {
    if spec.arch.is_gemma() {
        1.0 / (spec.hidden as f32).sqrt()
    } else {
        1.0
    }
}

/// Every tensor of `spec`, in GGUF file order: the converter's generated RoPE factors first,
/// then embedding, blocks, final norm, output.
pub(crate) fn tensor_defs(spec: &ModelSpec) -> Vec<TensorDef> {
    let h = spec.hidden;
    let head_dim = spec.head_dim();
    let q_dim = spec.q_dim();
    let kv = spec.kv_dim();
    let mut defs = Vec::new();
    let rope_factors = |name: &str| {
        TensorDef::new(
            name.into(),
            format!("{name}.weight"),
            vec![head_dim / 2],
            Role::RopeFactors,
        )
    };
    if spec.llama3_rope_freqs().is_some() && spec.write_rope_freqs {
        defs.push(rope_factors("rope_freqs"));
    }
    if spec.longrope_factors().is_some() {
        defs.push(rope_factors("rope_factors_long"));
        defs.push(rope_factors("rope_factors_short"));
    }
    defs.push(TensorDef::new(
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        vec![spec.vocab, h],
        Role::Embedding,
    ));
    let gemma = spec.arch.is_gemma();
    for n in 0..spec.layers {
        let hf = |s: &str| format!("model.layers.{n}.{s}");
        let gg = |s: &str| format!("blk.{n}.{s}");
        let linear = |hf_s: &str, gg_s: &str, rows: usize, cols: usize| {
            TensorDef::new(hf(hf_s), gg(gg_s), vec![rows, cols], Role::Linear)
        };
        let norm = |hf_s: &str, gg_s: &str, len: usize| {
            TensorDef::new(hf(hf_s), gg(gg_s), vec![len], Role::Norm)
        };

        defs.push(norm("input_layernorm.weight", "attn_norm.weight", h));
        if spec.arch == Arch::Phi3 {
            defs.push(linear(
                "self_attn.qkv_proj.weight",
                "attn_qkv.weight",
                q_dim + 2 * kv,
                h,
            ));
        } else {
            let mut q = linear("self_attn.q_proj.weight", "attn_q.weight", q_dim, h);
            let mut k = linear("self_attn.k_proj.weight", "attn_k.weight", kv, h);
            if spec.arch.permutes_qk() {
                q.gguf_rope_heads = Some(spec.heads);
                k.gguf_rope_heads = Some(spec.kv_heads);
            }
            defs.push(q);
            defs.push(k);
            defs.push(linear("self_attn.v_proj.weight", "attn_v.weight", kv, h));
        }
        if spec.arch.has_qkv_bias() {
            for (hf_s, gg_s, len) in [
                ("self_attn.q_proj.bias", "attn_q.bias", q_dim),
                ("self_attn.k_proj.bias", "attn_k.bias", kv),
                ("self_attn.v_proj.bias", "attn_v.bias", kv),
            ] {
                defs.push(TensorDef::new(hf(hf_s), gg(gg_s), vec![len], Role::Bias));
            }
        }
        if spec.arch.has_qk_norm() {
            defs.push(norm(
                "self_attn.q_norm.weight",
                "attn_q_norm.weight",
                head_dim,
            ));
            defs.push(norm(
                "self_attn.k_norm.weight",
                "attn_k_norm.weight",
                head_dim,
            ));
        }
        defs.push(linear(
            "self_attn.o_proj.weight",
            "attn_output.weight",
            h,
            q_dim,
        ));
        if gemma {
            defs.push(norm(
                "post_attention_layernorm.weight",
                "post_attention_norm.weight",
                h,
            ));
            defs.push(norm(
                "pre_feedforward_layernorm.weight",
                "ffn_norm.weight",
                h,
            ));
        } else {
            defs.push(norm(
                "post_attention_layernorm.weight",
                "ffn_norm.weight",
                h,
            ));
        }
        if spec.arch == Arch::Phi3 {
            // Gate rows first, then up rows, as Phi-3's `gate_up_proj` holds them.
            defs.push(linear(
                "mlp.gate_up_proj.weight",
                "ffn_up.weight",
                2 * spec.ffn,
                h,
            ));
        } else {
            defs.push(linear(
                "mlp.gate_proj.weight",
                "ffn_gate.weight",
                spec.ffn,
                h,
            ));
            defs.push(linear("mlp.up_proj.weight", "ffn_up.weight", spec.ffn, h));
        }
        defs.push(linear(
            "mlp.down_proj.weight",
            "ffn_down.weight",
            h,
            spec.ffn,
        ));
        if gemma {
            defs.push(norm(
                "post_feedforward_layernorm.weight",
                "post_ffw_norm.weight",
                h,
            ));
        }
    }
    defs.push(TensorDef::new(
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        vec![h],
        Role::OutputNorm,
    ));
    if !spec.tie_embeddings {
        defs.push(TensorDef::new(
            "lm_head.weight".into(),
            "output.weight".into(),
            vec![spec.vocab, h],
            Role::Output,
        ));
    }
    defs
}

/// llama.cpp's conversion of a q/k projection from Hugging Face to GGUF order
/// (`w.reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2).reshape(rows, cols)`).
///
/// Hugging Face rotates the two halves of each head (`rotate_half`); GGUF consumers rotate
/// adjacent pairs. Interleaving the halves' rows makes both compute the same attention.
pub fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    permute_rows(w, rows, cols, n_head, |head_dim, r| {
        // GGUF row 2i + j of a head takes HF row j * head_dim / 2 + i.
        let (i, j) = (r / 2, r % 2);
        j * head_dim / 2 + i
    })
}

/// The inverse of [`llama_cpp_permute`]: Hugging Face's `permute` from its llama conversion
/// script (`w.view(n_head, head_dim / 2, 2, cols).transpose(1, 2).reshape(rows, cols)`), which
/// turns interleaved rows back into halves.
pub fn hf_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    permute_rows(w, rows, cols, n_head, |head_dim, r| {
        // HF row j * head_dim / 2 + i takes interleaved row 2i + j.
        let half = head_dim / 2;
        let (j, i) = (r / half, r % half);
        2 * i + j
    })
}

/// Builds `out[row] = w[source(row)]` head by head; `source` maps a row within a head.
fn permute_rows(
    w: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
    source: impl Fn(usize, usize) -> usize,
) -> Vec<f32> {
    assert_eq!(w.len(), rows * cols, "matrix size does not match its shape");
    assert!(
        rows.is_multiple_of(n_head) && (rows / n_head).is_multiple_of(2),
        "rows {rows} do not split into {n_head} heads of even size"
    );
    let head_dim = rows / n_head;
    let mut out = Vec::with_capacity(w.len());
    for head in 0..n_head {
        for r in 0..head_dim {
            let src = head * head_dim + source(head_dim, r);
            out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols).map(|x| x as f32).collect()
    }

    #[test]
    fn llama_cpp_permute_interleaves_the_halves_of_each_head() {
        // Two heads of dim 4, one column: HF rows [a0 a1 b0 b1] per head become [a0 b0 a1 b1].
        let w = matrix(8, 1);
        assert_eq!(
            llama_cpp_permute(&w, 8, 1, 2),
            vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
    }

    #[test]
    fn hf_permute_undoes_llama_cpp_permute() {
        for (rows, cols, heads) in [(8, 3, 2), (24, 5, 3), (64, 16, 4), (32, 7, 1)] {
            let w = matrix(rows, cols);
            let gguf = llama_cpp_permute(&w, rows, cols, heads);
            assert_ne!(gguf, w, "head_dim > 2 must move rows");
            assert_eq!(hf_permute(&gguf, rows, cols, heads), w);
            assert_eq!(
                llama_cpp_permute(&hf_permute(&w, rows, cols, heads), rows, cols, heads),
                w
            );
        }
    }

    #[test]
    fn tied_models_have_no_output_head() {
        let tied = ModelSpec::tiny_qwen2();
        let defs = tensor_defs(&tied);
        assert!(defs.iter().all(|d| d.role != Role::Output));
        assert_eq!(
            defs.iter().filter(|d| d.role == Role::Bias).count(),
            3 * tied.layers
        );
        let untied = tensor_defs(&ModelSpec::tiny());
        assert_eq!(
            untied.last().map(|d| d.gguf_name.as_str()),
            Some("output.weight")
        );
    }

    #[test]
    fn values_depend_on_seed_and_name_only() {
        let spec = ModelSpec::tiny();
        let defs = tensor_defs(&spec);
        let q0 = defs
            .iter()
            .find(|d| d.hf_name.ends_with("0.self_attn.q_proj.weight"))
            .unwrap();
        assert_eq!(q0.generate(&spec), q0.generate(&spec));
        let reseeded = spec.clone().with_seed(1);
        assert_ne!(q0.generate(&spec), q0.generate(&reseeded));
        let k0 = defs
            .iter()
            .find(|d| d.hf_name.ends_with("0.self_attn.k_proj.weight"))
            .unwrap();
        assert_ne!(q0.generate(&spec)[..64], k0.generate(&spec)[..64]);
    }

    #[test]
    fn loud_rows_scale_about_one_row_in_n_of_the_scoring_matrix_only() {
        let loud = ModelSpec::small_arch(Arch::Gemma2);
        let l = loud.loud_rows.expect("gemma2 has loud rows");
        let quiet = ModelSpec {
            loud_rows: None,
            ..loud.clone()
        };
        let defs = tensor_defs(&loud);
        let embd = defs.iter().find(|d| d.role == Role::Embedding).unwrap();
        let (a, b) = (embd.generate(&loud), embd.generate(&quiet));
        let mut scaled = 0;
        for (a, b) in a.chunks(loud.hidden).zip(b.chunks(loud.hidden)) {
            if a != b {
                scaled += 1;
                assert!(a.iter().zip(b).all(|(a, b)| *a == l.scale * b));
            }
        }
        let expected = loud.vocab / l.one_in as usize;
        assert!(
            (expected / 2..=expected * 2).contains(&scaled),
            "{scaled} loud rows of {}, expected about {expected}",
            loud.vocab
        );
        // Nothing else changes.
        for d in defs.iter().filter(|d| d.role != Role::Embedding) {
            assert_eq!(d.generate(&loud), d.generate(&quiet), "{}", d.hf_name);
        }
        // An untied head gets them, not the embedding.
        let untied = ModelSpec {
            loud_rows: Some(l),
            ..ModelSpec::small()
        };
        let defs = tensor_defs(&untied);
        let out = defs.iter().find(|d| d.role == Role::Output).unwrap();
        let embd = defs.iter().find(|d| d.role == Role::Embedding).unwrap();
        assert_ne!(out.generate(&untied), out.generate(&ModelSpec::small()));
        assert_eq!(embd.generate(&untied), embd.generate(&ModelSpec::small()));
    }
}
