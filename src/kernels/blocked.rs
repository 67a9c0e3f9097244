//! Channels-last direct convolution for the wider layers on small grids (32 to 128 channels on
//! up to 256 positions: a CIFAR ResNet's 3-16 px stages): the output channels lie along the
//! vector lanes, as in oneDNN's blocked layouts. The column path's products there are short on one side (`[Co, C·kh·kw] ×
//! [C·kh·kw, G·OH·OW]` with Co = 48 or 96) and pay for im2col's copy and gemm's packing; here a
//! tile of 8 rows × 48 lanes keeps its 24 accumulators over every term, reading 3 vectors and 8
//! broadcast values a term for 24 fused multiply-adds.
//!
//! One routine, [`broadcast_sums`], serves the forward pass (rows = output positions, terms =
//! taps × input channels), the input gradient (the same with the taps mirrored and the
//! channels swapped) and the weight gradient (rows = input channels, terms = positions).

/// `out[r·out_row + o] (+)= Σₖ a[rows[r] + terms[k].0] · b[terms[k].1 + o]` for r < `rows.len()`
/// and o < `outputs` (a multiple of 16), adding onto `out` where `accumulate`, else writing it.
/// Each value sums its terms in order in blocks of 128 (one fused multiply-add each from zero,
/// a block's sum then added onto `out`'s value, or written for the first block unless
/// `accumulate`): the same bits whatever the tile or thread.
///
/// Runs on AVX-512 only: callers plan this path only where [`available`] says so.
///
/// # Panics
/// If `outputs` is not a multiple of 16, if a read or write would fall outside `a`, `b` or
/// `out`, or if the CPU lacks AVX-512F (with rows, outputs and terms to sum).
#[allow(clippy::too_many_arguments)]
pub(super) fn broadcast_sums(
    a: &[f32],
    rows: &[usize],
    b: &[f32],
    terms: &[(usize, usize)],
    outputs: usize,
    out: &mut [f32],
    out_row: usize,
    accumulate: bool,
) {
    assert!(outputs.is_multiple_of(16), "outputs in whole vectors of 16");
    if rows.is_empty() || outputs == 0 {
        return;
    }
    if terms.is_empty() {
        if !accumulate {
            for r in 0..rows.len() {
                out[r * out_row..r * out_row + outputs].fill(0.0);
            }
        }
        return;
    }
    let max = |x: &mut dyn Iterator<Item = usize>| x.max().unwrap_or(0);
    let a_reach = max(&mut rows.iter().copied()).checked_add(max(&mut terms.iter().map(|t| t.0)));
    let b_reach = max(&mut terms.iter().map(|t| t.1)).checked_add(outputs);
    let out_reach = (rows.len() - 1)
        .checked_mul(out_row)
        .and_then(|r| r.checked_add(outputs));
    assert!(a_reach.is_some_and(|r| r < a.len()), "a term reads past a");
    assert!(b_reach.is_some_and(|r| r <= b.len()), "a term reads past b");
    assert!(out_row >= outputs && out_reach.is_some_and(|r| r <= out.len()));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the asserts keep every access in bounds.
        unsafe { avx512::broadcast_sums(a, rows, b, terms, outputs, out, out_row, accumulate) };
        return;
    }
    panic!("the channels-last sums are planned only where the CPU has AVX-512F");
}

/// Whether to plan [`broadcast_sums`]: the CPU has AVX-512F and [`super::limit_vector_width`]
/// allows it. There is no AVX2 version: elsewhere the convolution takes its other paths, whose
/// sums run in another order (other float rounding, within 1e-5).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::vector_width_limit() >= 2 && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `dst[at[j] + i] = src[i·stride + j]` for i < `count` and j < `at.len()`: a transpose whose
/// source rows run along j and whose destination runs `at[j]..at[j] + count` start anywhere (a
/// padded channels-last image's pixels, or a channels-first tensor's planes) and do not overlap.
/// Blocks of 16 × 16 go through registers.
///
/// Runs on AVX-512 only, as [`broadcast_sums`], whose layouts it copies.
///
/// # Panics
/// If a read or write would fall outside `src` or `dst`, or if the CPU lacks AVX-512F.
pub(super) fn transpose(
    src: &[f32],
    (count, stride): (usize, usize),
    dst: &mut [f32],
    at: &[usize],
) {
    if count == 0 || at.is_empty() {
        return;
    }
    let src_reach = (count - 1)
        .checked_mul(stride)
        .and_then(|r| r.checked_add(at.len()));
    let dst_reach = at.iter().max().and_then(|&a| a.checked_add(count));
    assert!(src_reach.is_some_and(|r| r <= src.len()), "a read past src");
    assert!(
        dst_reach.is_some_and(|r| r <= dst.len()),
        "a write past dst"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the asserts keep every access in bounds.
        unsafe { avx512::transpose(src, (count, stride), dst, at) };
        return;
    }
    panic!("the channels-last copies are planned only where the CPU has AVX-512F");
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::broadcast_sums`]: tiles of 8, 4, 2 and 1 rows × 3, 2 and 1 vectors of lanes.
    ///
    /// # Safety
    /// AVX-512F; the caller's asserts hold.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn broadcast_sums(
        a: &[f32],
        rows: &[usize],
        b: &[f32],
        terms: &[(usize, usize)],
        outputs: usize,
        out: &mut [f32],
        out_row: usize,
        accumulate: bool,
    ) {
        let mut o0 = 0;
        while o0 < outputs {
            let vectors = ((outputs - o0) / 16).min(3);
            // The terms a block at a time, so that the block's `b` vectors stay in L1 while
            // every row tile reads them.
            for (block, terms) in terms.chunks(TERMS_PER_BLOCK).enumerate() {
                let tile = Tile {
                    a: a.as_ptr(),
                    b: b.as_ptr(),
                    terms,
                    out: out.as_mut_ptr(),
                    out_row,
                    accumulate: accumulate || block > 0,
                };
                let mut r0 = 0;
                while r0 < rows.len() {
                    let left = rows.len() - r0;
                    let r = [8, 4, 2, 1].into_iter().find(|&r| r <= left).unwrap();
                    let rows = &rows[r0..r0 + r];
                    // SAFETY: the caller's bounds.
                    unsafe {
                        match (r, vectors) {
                            (8, 3) => tile.run::<8, 3>(rows, r0, o0),
                            (8, 2) => tile.run::<8, 2>(rows, r0, o0),
                            (8, _) => tile.run::<8, 1>(rows, r0, o0),
                            (4, 3) => tile.run::<4, 3>(rows, r0, o0),
                            (4, 2) => tile.run::<4, 2>(rows, r0, o0),
                            (4, _) => tile.run::<4, 1>(rows, r0, o0),
                            (2, 3) => tile.run::<2, 3>(rows, r0, o0),
                            (2, 2) => tile.run::<2, 2>(rows, r0, o0),
                            (2, _) => tile.run::<2, 1>(rows, r0, o0),
                            (_, 3) => tile.run::<1, 3>(rows, r0, o0),
                            (_, 2) => tile.run::<1, 2>(rows, r0, o0),
                            (_, _) => tile.run::<1, 1>(rows, r0, o0),
                        }
                    }
                    r0 += r;
                }
            }
            o0 += 16 * vectors;
        }
    }

    /// [`super::transpose`] in blocks of 16 × 16: up to 16 source rows i0.. loaded (masked
    /// past the last j), turned in registers, each j's values stored at `at[j] + i0` (masked
    /// past the last i).
    ///
    /// # Safety
    /// AVX-512F; the caller's asserts hold.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose(
        src: &[f32],
        (count, stride): (usize, usize),
        dst: &mut [f32],
        at: &[usize],
    ) {
        let lanes = |n: usize| if n >= 16 { WHOLE } else { (1u16 << n) - 1 };
        let (src, dst) = (src.as_ptr(), dst.as_mut_ptr());
        for i0 in (0..count).step_by(16) {
            let ni = (count - i0).min(16);
            for j0 in (0..at.len()).step_by(16) {
                let nj = (at.len() - j0).min(16);
                let mut block = [_mm512_setzero_ps(); 16];
                for (i, row) in block.iter_mut().enumerate().take(ni) {
                    let from = src.wrapping_add((i0 + i) * stride + j0);
                    // SAFETY: the caller's bounds; lanes past nj are not read.
                    *row = unsafe { _mm512_maskz_loadu_ps(lanes(nj), from) };
                }
                let block = turn(block);
                for (j, column) in block.iter().enumerate().take(nj) {
                    let to = dst.wrapping_add(at[j0 + j] + i0);
                    // SAFETY: the caller's bounds; lanes past ni are not written.
                    unsafe { _mm512_mask_storeu_ps(to, lanes(ni), *column) };
                }
            }
        }
    }

    /// The 16 × 16 transpose of `r` (row i, lane j → row j, lane i): pairs of rows
    /// interleaved, then pairs of pairs, then 128-bit lanes twice.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn turn(r: [__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        for k in 0..8 {
            t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            let (a, b) = (4 * k, 4 * k + 2);
            u[4 * k] = _mm512_shuffle_ps::<0x44>(t[a], t[b]);
            u[4 * k + 1] = _mm512_shuffle_ps::<0xEE>(t[a], t[b]);
            u[4 * k + 2] = _mm512_shuffle_ps::<0x44>(t[a + 1], t[b + 1]);
            u[4 * k + 3] = _mm512_shuffle_ps::<0xEE>(t[a + 1], t[b + 1]);
        }
        for k in 0..2 {
            for m in 0..4 {
                let (a, b) = (8 * k + m, 8 * k + m + 4);
                t[8 * k + m] = _mm512_shuffle_f32x4::<0x88>(u[a], u[b]);
                t[8 * k + m + 4] = _mm512_shuffle_f32x4::<0xDD>(u[a], u[b]);
            }
        }
        for m in 0..8 {
            u[m] = _mm512_shuffle_f32x4::<0x88>(t[m], t[m + 8]);
            u[m + 8] = _mm512_shuffle_f32x4::<0xDD>(t[m], t[m + 8]);
        }
        u
    }

    /// Terms a block: 128 × 48 lanes of `b` are 24 KiB, half an L1 data cache.
    const TERMS_PER_BLOCK: usize = 128;

    /// All 16 lanes.
    const WHOLE: u16 = u16::MAX;

    /// What every tile of one call shares.
    struct Tile<'a> {
        a: *const f32,
        b: *const f32,
        terms: &'a [(usize, usize)],
        out: *mut f32,
        out_row: usize,
        accumulate: bool,
    }

    impl Tile<'_> {
        /// Rows r0..r0 + R (reading `a` from `rows[i]` on) × lanes o0..o0 + 16·V.
        ///
        /// # Safety
        /// AVX-512F; every access inside the caller's slices.
        #[target_feature(enable = "avx512f,fma")]
        #[inline]
        unsafe fn run<const R: usize, const V: usize>(&self, rows: &[usize], r0: usize, o0: usize) {
            let mut a = [self.a; R];
            for (ar, &row) in a.iter_mut().zip(rows) {
                *ar = self.a.wrapping_add(row);
            }
            let b = self.b.wrapping_add(o0);
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for &(ka, kb) in self.terms {
                let bk = b.wrapping_add(kb);
                let mut bv = [_mm512_setzero_ps(); V];
                for (v, bv) in bv.iter_mut().enumerate() {
                    // SAFETY: the caller's bounds. (A whole mask: a plain load, which
                    // `_mm512_loadu_ps` would not compile to with debug assertions on.)
                    *bv = unsafe { _mm512_maskz_loadu_ps(WHOLE, bk.wrapping_add(16 * v)) };
                }
                for i in 0..R {
                    // SAFETY: the caller's bounds (`_mm_load_ss` checks no alignment).
                    let x = _mm512_broadcastss_ps(unsafe { _mm_load_ss(a[i].wrapping_add(ka)) });
                    for v in 0..V {
                        acc[i][v] = _mm512_fmadd_ps(x, bv[v], acc[i][v]);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                let y = self.out.wrapping_add((r0 + i) * self.out_row + o0);
                for (v, sum) in row.iter().enumerate() {
                    let y = y.wrapping_add(16 * v);
                    // SAFETY: the caller's bounds.
                    unsafe {
                        let sum = match self.accumulate {
                            true => _mm512_add_ps(_mm512_maskz_loadu_ps(WHOLE, y), *sum),
                            false => *sum,
                        };
                        _mm512_mask_storeu_ps(y, WHOLE, sum);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::broadcast_sums;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn transpose_every_block_and_tail() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return; // the copies run on AVX-512 only
        }
        // Whole blocks and tails on both sides, destinations scattered with gaps left alone.
        for (count, n, stride) in [
            (16, 16, 16),
            (48, 9, 36),
            (5, 37, 40),
            (33, 100, 100),
            (1, 1, 1),
        ] {
            let src: Vec<f32> = (0..count * stride).map(|v| v as f32).collect();
            let at: Vec<usize> = (0..n).map(|j| (n - 1 - j) * (count + 3)).collect();
            let mut dst = vec![-1.0; n * (count + 3)];
            super::transpose(&src, (count, stride), &mut dst, &at);
            for (k, &v) in dst.iter().enumerate() {
                let (j, i) = (n - 1 - k / (count + 3), k % (count + 3));
                let want = if i < count { src[i * stride + j] } else { -1.0 };
                assert_eq!(v, want, "{count}×{n}: dst[{k}]");
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn broadcast_sums_every_tile_and_tail() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return; // the sums run on AVX-512 only
        }
        // Rows in tiles of 8, 4, 2, 1 and lanes in 3, 2 and 1 vectors, terms in blocks of 128
        // and none, against an f64 sum; out's extra columns and accumulation as documented.
        let value =
            |i: usize, seed: usize| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 250.0;
        for (rows, outputs, terms) in [
            (1, 16, 1),
            (15, 48, 9),
            (13, 80, 40),
            (8, 128, 3),
            (9, 48, 300),
            (3, 16, 0),
        ] {
            let row_at: Vec<usize> = (0..rows).map(|r| (r * 7) % 23).collect();
            let ks: Vec<(usize, usize)> = (0..terms).map(|k| ((k * 5) % 11, k * outputs)).collect();
            let a: Vec<f32> = (0..40).map(|i| value(i, 1)).collect();
            let b: Vec<f32> = (0..terms * outputs).map(|i| value(i, 2)).collect();
            let out_row = outputs + 3;
            let before: Vec<f32> = (0..rows * out_row).map(|i| value(i, 3)).collect();
            for accumulate in [false, true] {
                let mut out = before.clone();
                broadcast_sums(&a, &row_at, &b, &ks, outputs, &mut out, out_row, accumulate);
                for (i, &y) in out.iter().enumerate() {
                    let (r, o) = (i / out_row, i % out_row);
                    if o >= outputs {
                        assert_eq!(y, before[i], "a column past the outputs was written");
                        continue;
                    }
                    let sum: f64 = ks
                        .iter()
                        .map(|&(ka, kb)| a[row_at[r] + ka] as f64 * b[kb + o] as f64)
                        .sum();
                    let want = sum + if accumulate { before[i] as f64 } else { 0.0 };
                    assert!(
                        (y as f64 - want).abs() < 1e-4,
                        "{rows}×{outputs}: {y} vs {want}"
                    );
                }
            }
        }
    }
}
