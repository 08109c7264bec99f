//! The attention of a span of query rows ([`super::super::attention::attend_with`]) compiled
//! with AVX2, its query-key products in AVX2 intrinsics with the portable order of additions:
//! eight lanes of partial sums per key, added as halves (lanes `i` and `i + 4`, then `i` and
//! `i + 2`, then 0 and 1). Eight keys' lanes are added together by shuffles, which take the
//! same pairs as one key's halves. Reachable only through [`super::x86::kernels`], which hands
//! it out after `is_x86_feature_detected!` has proved the CPU runs AVX2, FMA and F16C; that
//! check is what makes every `unsafe` call below sound.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::super::attention::{Dots, HeadAttn, attend_with};

pub(super) fn attend(head: &HeadAttn<'_>, out: &mut [f32], scores: &mut [f32]) {
    #[target_feature(enable = "avx2,fma,f16c")]
    fn inner(head: &HeadAttn<'_>, out: &mut [f32], scores: &mut [f32]) {
        attend_with(head, out, scores, Avx2);
    }
    // SAFETY: AVX2, FMA and F16C were detected before this function was handed out.
    unsafe { inner(head, out, scores) }
}

/// The AVX2 products; a value is made only inside `attend`, which runs after the CPU's AVX2
/// was detected, so that its safe methods are sound.
#[derive(Clone, Copy)]
struct Avx2;

impl Dots for Avx2 {
    #[inline(always)]
    fn dot(self, q: &[f32], k: &[f32]) -> f32 {
        // SAFETY: only called from `attend`'s AVX2 code (see the module's note).
        unsafe { dot_f32_avx2(q, k) }
    }

    #[inline(always)]
    fn dot8(self, q: &[f32], k: &[f32]) -> [f32; 8] {
        // SAFETY: as in `dot`.
        unsafe { dot8_f32_avx2(q, k) }
    }
}

/// [`super::super::attention::dot_f32`] in AVX2, with the same order of additions (so the same
/// result bit for bit): one vector of eight partial sums, its halves added as 128, 64 and 32
/// bits, then the tail's products.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let body = a.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for i in (0..body).step_by(8) {
        // SAFETY: `i + 8 <= body <= len` for both slices.
        let (x, y) = unsafe {
            (
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
            )
        };
        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
    }
    let tail: f32 = a[body..].iter().zip(&b[body..]).map(|(x, y)| x * y).sum();
    let quads = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let pairs = _mm_add_ps(quads, _mm_movehl_ps(quads, quads));
    let one = _mm_add_ss(pairs, _mm_shuffle_ps::<0b01>(pairs, pairs));
    _mm_cvtss_f32(one) + tail
}

/// [`super::super::attention::dot8_f32`] in AVX2: `q` with each of the eight consecutive keys
/// of `k`, one vector of partial sums per key, each summed in [`dot_f32_avx2`]'s order.
///
/// # Safety
/// The CPU must run AVX2. Not a `target_feature` function, which could not be always inlined
/// into the loop that calls it.
#[inline(always)]
unsafe fn dot8_f32_avx2(q: &[f32], k: &[f32]) -> [f32; 8] {
    let hd = q.len();
    assert_eq!(k.len(), 8 * hd);
    let body = hd / 8 * 8;
    let mut out = [0f32; 8];
    // SAFETY: the caller runs AVX2. Each load reads `c..c + 8` with `c + 8 <= body <= hd` of
    // `q` or of one of the eight keys of `hd` in `k`; the store writes the eight of `out`.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..body).step_by(8) {
            let x = _mm256_loadu_ps(q.as_ptr().add(c));
            for (j, acc) in acc.iter_mut().enumerate() {
                let y = _mm256_loadu_ps(k.as_ptr().add(j * hd + c));
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, y));
            }
        }
        // Lanes i and i + 4 of keys (0, 1), (2, 3), …: each result holds two keys' four sums.
        let halves = |a: __m256, b: __m256| {
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(a, b),
                _mm256_permute2f128_ps::<0x31>(a, b),
            )
        };
        let (k01, k23) = (halves(acc[0], acc[1]), halves(acc[2], acc[3]));
        let (k45, k67) = (halves(acc[4], acc[5]), halves(acc[6], acc[7]));
        // Then lanes i and i + 2 of those four: per 128 bits (key a: 0 + 2, 1 + 3, key b: …),
        // keys 0 and 2 in the low half, 1 and 3 in the high one.
        let quarters = |a: __m256, b: __m256| {
            _mm256_add_ps(
                _mm256_shuffle_ps::<0x44>(a, b),
                _mm256_shuffle_ps::<0xEE>(a, b),
            )
        };
        let (k0123, k4567) = (quarters(k01, k23), quarters(k45, k67));
        // Then the two that are left: keys 0, 2, 4, 6 in the low half, 1, 3, 5, 7 in the high.
        let sums = _mm256_add_ps(
            _mm256_shuffle_ps::<0x88>(k0123, k4567),
            _mm256_shuffle_ps::<0xDD>(k0123, k4567),
        );
        let mut sums = _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        if body == hd {
            // The products of no elements, added as the portable code adds them.
            let none: f32 = std::iter::empty::<f32>().sum();
            sums = _mm256_add_ps(sums, _mm256_set1_ps(none));
        }
        _mm256_storeu_ps(out.as_mut_ptr(), sums);
    }
    if body < hd {
        for (j, o) in out.iter_mut().enumerate() {
            let tail: f32 = q[body..]
                .iter()
                .zip(&k[j * hd + body..(j + 1) * hd])
                .map(|(x, y)| x * y)
                .sum();
            *o += tail;
        }
    }
    out
}
