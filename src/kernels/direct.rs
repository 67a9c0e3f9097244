//! Direct convolution for the narrow layers of a CIFAR ResNet (few channels, stride 1): the
//! kernel taps read the zero-padded image in place, as the tap-by-tap products of
//! [`super::ConvShape`] do, but all taps and channels of an output tile are summed in registers.
//! The tap-by-tap products take one gemm per tap with k = C (8 for an eighth-width ResNet-18):
//! each of gemm's 16×6 tiles then loads and stores its accumulators every 8 multiply-adds, and
//! an 8-channel output fills half of its 16 rows. Here a tile of 4 output channels × 24
//! positions keeps its 12 accumulators over all C·kh·kw terms (72 at 8 channels), reading 3
//! vectors of the image and 4 weights for 12 FMAs: the loads stay under the FMAs' issue rate.
//! On AVX-512 a tile is 8 output channels × 48 positions (24 accumulators of 16 lanes), with
//! the same sums in the same order: the same bits.
//!
//! One routine serves the forward pass and the input gradient, which is the same correlation
//! with the roles of C and Co swapped and the taps mirrored ([`correlate`]). The weight
//! gradient, a sum over the positions, has its own ([`weight_grad`]): there the outputs lie
//! along the lanes.

/// Where each term of a correlation over an input of `channels` planes `plane` apart starts
/// reading: term k = t·channels + c (taps outermost, as the weights' `[taps, C]`) at
/// c·plane + `taps[t]`.
pub(super) fn terms(taps: &[usize], channels: usize, plane: usize) -> Vec<usize> {
    taps.iter()
        .flat_map(|&tap| (0..channels).map(move |c| c * plane + tap))
        .collect()
}

/// `out[o, p] = Σₖ w[k·O + o] · input[offsets[k] + p]` for o < O, p < P: a correlation whose
/// term k reads the input from `offsets[k]` on (channel plane and tap offset in one), with
/// weights `w` `[K, O]` (the K terms' weights of every output, contiguous by term). `out` is
/// `[O, P]` with rows `out_row` apart. Sums run over k in order, in f32 with fused
/// multiply-adds, the same bits whatever the thread.
///
/// Runs on AVX-512 where the CPU has it and [`super::limit_vector_width`] allows, else on AVX2:
/// the same sums in the same order, so the same bits. Returns `false` (and does nothing) where
/// the CPU lacks AVX2 and FMA: the caller takes the products instead.
///
/// # Panics
/// If an index the offsets, `P` or `O` reach lies outside `input`, `w` or `out`.
#[allow(clippy::too_many_arguments)]
pub(super) fn correlate(
    w: &[f32],
    outputs: usize,
    offsets: &[usize],
    input: &[f32],
    positions: usize,
    out: &mut [f32],
    out_row: usize,
) -> bool {
    let (o, p) = (outputs, positions);
    if o == 0 || p == 0 {
        return true;
    }
    assert_eq!(w.len(), offsets.len() * o, "weights of K terms × O outputs");
    let reach = offsets.iter().max().copied().unwrap_or(0) + p;
    assert!(
        input.len() >= reach,
        "the input ends before a term's last read"
    );
    assert!(out_row >= p && out.len() >= (o - 1) * out_row + p);
    #[cfg(target_arch = "x86_64")]
    if super::vector_width_limit() >= 2 && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the asserts keep every read and write in bounds.
        unsafe { avx512::correlate(w, o, offsets, input, p, out, out_row) };
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA; the asserts keep every read and write in bounds.
        unsafe { avx2::correlate(w, o, offsets, input, p, out, out_row) };
        return true;
    }
    false
}

/// The weight gradient of a correlation, `out[k·O + o] += Σ_i Σ_j input[offsets[k] + i·row + j]
/// · grad_t[(i·W + j)·O + o]` over the output's R rows of W positions (`rows` = (R, W, row):
/// the input's rows `row` apart, the output gradient `grad_t` transposed, `[R·W, O]`), for K
/// terms, term k reading the input from `offsets[k]` on, and O = `outputs`. Tap by tap a narrow
/// layer's weight gradient takes one product per tap and image with k = the positions and only
/// `C × Co` outputs (32 × 32 at 6 px), too small for gemm's tiles and packing; here the
/// outputs lie along the vector lanes and stay in registers over all positions: a tile of
/// terms × output vectors reads one vector of `grad_t` and one broadcast value of the input a
/// term per position. No position off the output grid is read.
///
/// Each `out` value sums its products over the positions in order, one fused multiply-add
/// each, from its value on entry: the same bits on AVX-512 and AVX2, and across calls (images) the
/// sum goes on in the order of the calls. Runs on AVX-512 where the CPU has it and
/// [`super::limit_vector_width`] allows, else on AVX2; returns `false` (doing nothing) where the
/// CPU lacks AVX2 and FMA: the caller takes the products instead.
///
/// # Panics
/// If a read or write would fall outside `grad_t`, `input` or `out`.
pub(super) fn weight_grad(
    grad_t: &[f32],
    outputs: usize,
    offsets: &[usize],
    input: &[f32],
    rows: (usize, usize, usize),
    out: &mut [f32],
) -> bool {
    let (r, w, row) = rows;
    if outputs == 0 || offsets.is_empty() || r == 0 || w == 0 {
        return true;
    }
    assert!(grad_t.len() >= r * w * outputs, "the gradient ends early");
    assert!(
        out.len() >= offsets.len() * outputs,
        "the weight gradient ends early"
    );
    let reach = offsets.iter().max().copied().unwrap_or(0) + (r - 1) * row + w;
    assert!(
        input.len() >= reach,
        "the input ends before a term's last read"
    );
    #[cfg(target_arch = "x86_64")]
    if super::vector_width_limit() >= 2 && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the asserts keep every read and write in bounds.
        unsafe { avx512::weight_grad(grad_t, outputs, offsets, input, rows, out) };
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA; the asserts keep every read and write in bounds.
        unsafe { avx2::weight_grad(grad_t, outputs, offsets, input, rows, out) };
        return true;
    }
    false
}

/// Whether the first `n` (a multiple of 3) of `terms` exist and come in runs of three
/// consecutive offsets (the taps along a row of a 3×3 kernel), as [`weight_grad`]'s tiles read
/// them.
#[cfg(target_arch = "x86_64")]
fn runs_of_three(terms: &[usize], n: usize) -> bool {
    terms.len() >= n
        && terms[..n]
            .chunks_exact(3)
            .all(|run| run[1] == run[0] + 1 && run[2] == run[0] + 2)
}

/// [`weight_grad`] on one instruction set, in the module that invokes it with its target
/// features, its lane mask type and lane count L, and how many runs of three terms a tile of
/// two vectors of outputs takes (what its registers hold beside the gradient's vectors: 2 on
/// AVX2, 3 on AVX-512). The module gives `zero`, `load`, `store`, `splat` (a broadcast input
/// value) and `fma` on its vectors, and `lanes(n)`, a mask of the first n lanes.
///
/// The outputs go in chunks of up to 2 vectors (2·L), in tiles of 9 terms × 1 vector or of the
/// pair's runs × 2 where the terms come in runs of three, else one term at a time. Each output
/// sums over the positions in order, one fused multiply-add each: the same bits at any L.
#[cfg(target_arch = "x86_64")]
macro_rules! weight_grad_tiles {
    ($features:literal, $mask:ty, $lanes:literal, $pair_runs:literal) => {
        /// [`super::weight_grad`] on these instruction sets ([`weight_grad_tiles`]).
        ///
        /// # Safety
        /// The CPU must have the target features; the caller's asserts must hold.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn weight_grad(
            grad_t: &[f32],
            o: usize,
            offsets: &[usize],
            input: &[f32],
            rows: (usize, usize, usize),
            out: &mut [f32],
        ) {
            for o0 in (0..o).step_by(2 * $lanes) {
                let left = (o - o0).min(2 * $lanes);
                let mut masks = [lanes($lanes); 2];
                masks[left.div_ceil($lanes) - 1] = lanes((left - 1) % $lanes + 1);
                let tile = GradTile {
                    grad: grad_t.as_ptr().wrapping_add(o0),
                    o,
                    input: input.as_ptr(),
                    rows,
                    out: out.as_mut_ptr().wrapping_add(o0),
                    masks,
                };
                let pair = left > $lanes;
                let mut k0 = 0;
                while k0 < offsets.len() {
                    let terms = &offsets[k0..];
                    let tile_terms = if pair { 3 * $pair_runs } else { 9 };
                    // SAFETY: the tile's terms lie inside K, its outputs (the last vector
                    // masked) inside O: the caller's bounds.
                    k0 += unsafe {
                        match (pair, super::runs_of_three(terms, tile_terms)) {
                            (false, true) => tile.run::<3, 3, 1>(terms, k0),
                            (true, true) => tile.run::<$pair_runs, 3, 2>(terms, k0),
                            (false, false) => tile.run::<1, 1, 1>(terms, k0),
                            (true, false) => tile.run::<1, 1, 2>(terms, k0),
                        }
                    };
                }
            }
        }

        /// One chunk of outputs of a weight gradient and the lane masks of its (up to 2)
        /// vectors.
        struct GradTile {
            grad: *const f32,
            o: usize,
            input: *const f32,
            rows: (usize, usize, usize),
            out: *mut f32,
            masks: [$mask; 2],
        }

        impl GradTile {
            /// Terms k0..k0 + G·D (their offsets `terms`, each group's D consecutive: D taps
            /// along a kernel row) × the chunk's first V vectors of outputs, summed over every
            /// position onto `out`; returns G·D. A group's D terms read the input through one
            /// pointer, so that a tile's pointers stay in registers (24 pointers a tile spilled
            /// to the stack). The input is read with `_mm_load_ss` (`splat`): a plain read of a
            /// raw pointer carries an alignment check under debug assertions (this crate's dev
            /// and test profiles), a compare and a branch a multiply-add.
            ///
            /// # Safety
            /// The target features; every read and write inside the caller's slices; each
            /// group's terms consecutive.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn run<const G: usize, const D: usize, const V: usize>(
                &self,
                terms: &[usize],
                k0: usize,
            ) -> usize {
                let (r, w, row) = self.rows;
                let mut acc = [[[zero(); V]; D]; G];
                let sums_at = |g: usize, d: usize| self.out.wrapping_add((k0 + g * D + d) * self.o);
                for (g, group) in acc.iter_mut().enumerate() {
                    for (d, sums) in group.iter_mut().enumerate() {
                        for (v, a) in sums.iter_mut().enumerate() {
                            let y = sums_at(g, d).wrapping_add($lanes * v);
                            // SAFETY: the caller's bounds, the last vector masked.
                            *a = unsafe { load(y, self.masks[v]) };
                        }
                    }
                }
                let mut grad = self.grad;
                for i in 0..r {
                    let first = std::array::from_fn::<_, G, _>(|g| {
                        self.input.wrapping_add(terms[g * D]).wrapping_add(i * row)
                    });
                    for j in 0..w {
                        let mut gs = [zero(); V];
                        for (v, gv) in gs.iter_mut().enumerate() {
                            // SAFETY: the caller's bounds, the last vector masked.
                            *gv = unsafe { load(grad.wrapping_add($lanes * v), self.masks[v]) };
                        }
                        grad = grad.wrapping_add(self.o);
                        for (group, x) in acc.iter_mut().zip(&first) {
                            let x = x.wrapping_add(j);
                            for (d, sums) in group.iter_mut().enumerate() {
                                // SAFETY: inside the input, by the caller's reach.
                                let b = unsafe { splat(x.wrapping_add(d)) };
                                for (a, gv) in sums.iter_mut().zip(&gs) {
                                    *a = fma(b, *gv, *a);
                                }
                            }
                        }
                    }
                }
                for (g, group) in acc.iter().enumerate() {
                    for (d, sums) in group.iter().enumerate() {
                        for (v, a) in sums.iter().enumerate() {
                            let y = sums_at(g, d).wrapping_add($lanes * v);
                            // SAFETY: the caller's bounds, the last vector masked.
                            unsafe { store(y, self.masks[v], *a) };
                        }
                    }
                }
                G * D
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::correlate`] on AVX2 + FMA, in tiles of up to 4 outputs × 24 positions: 12
    /// accumulators, 3 input vectors and a broadcast weight fill AVX2's 16 registers. The
    /// positions left over from 24 take a tile of 1 to 3 vectors whose last is masked; the
    /// outputs left over from 4 a tile of 1 to 3 rows. Every tile keeps at least 3 independent
    /// sums, so none waits on one chain of multiply-adds.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; the caller's asserts must hold.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn correlate(
        w: &[f32],
        o: usize,
        offsets: &[usize],
        input: &[f32],
        p: usize,
        out: &mut [f32],
        out_row: usize,
    ) {
        let tile = Tile {
            o,
            offsets,
            input: input.as_ptr(),
            out: out.as_mut_ptr(),
            out_row,
        };
        for p0 in (0..p).step_by(24) {
            let left = p - p0;
            let mask = lanes(match left % 8 {
                0 => 8,
                r if left < 24 => r,
                _ => 8,
            });
            for o0 in (0..o).step_by(4) {
                let w = &w[o0..];
                let at = (o0, p0);
                // SAFETY: the tile's outputs and positions lie inside o and p (the last vector
                // masked to p), within the caller's bounds.
                unsafe {
                    match (
                        (o - o0).min(4),
                        left.div_ceil(8).min(3),
                        left.is_multiple_of(8) || left > 24,
                    ) {
                        (4, 3, true) => tile.run::<4, 3, false>(w, at, mask),
                        (3, 3, true) => tile.run::<3, 3, false>(w, at, mask),
                        (2, 3, true) => tile.run::<2, 3, false>(w, at, mask),
                        (1, 3, true) => tile.run::<1, 3, false>(w, at, mask),
                        (4, 3, _) => tile.run::<4, 3, true>(w, at, mask),
                        (4, 2, _) => tile.run::<4, 2, true>(w, at, mask),
                        (4, _, _) => tile.run::<4, 1, true>(w, at, mask),
                        (3, 3, _) => tile.run::<3, 3, true>(w, at, mask),
                        (3, 2, _) => tile.run::<3, 2, true>(w, at, mask),
                        (3, _, _) => tile.run::<3, 1, true>(w, at, mask),
                        (2, 3, _) => tile.run::<2, 3, true>(w, at, mask),
                        (2, 2, _) => tile.run::<2, 2, true>(w, at, mask),
                        (2, _, _) => tile.run::<2, 1, true>(w, at, mask),
                        (_, 3, _) => tile.run::<1, 3, true>(w, at, mask),
                        (_, 2, _) => tile.run::<1, 2, true>(w, at, mask),
                        (_, _, _) => tile.run::<1, 1, true>(w, at, mask),
                    }
                }
            }
        }
    }

    weight_grad_tiles!("avx2,fma", __m256i, 8, 2);

    /// What [`weight_grad_tiles`] computes with: zeros, masked loads and stores, a broadcast
    /// input value and a fused multiply-add.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn zero() -> __m256 {
        _mm256_setzero_ps()
    }

    /// # Safety
    /// The lanes `mask` keeps lie inside an allocation.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load(at: *const f32, mask: __m256i) -> __m256 {
        unsafe { _mm256_maskload_ps(at, mask) }
    }

    /// # Safety
    /// The lanes `mask` keeps lie inside an allocation.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store(at: *mut f32, mask: __m256i, v: __m256) {
        unsafe { _mm256_maskstore_ps(at, mask, v) }
    }

    /// # Safety
    /// `at` points into an allocation.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn splat(at: *const f32) -> __m256 {
        _mm256_broadcastss_ps(unsafe { _mm_load_ss(at) })
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }

    /// A mask of the first `n` of 8 lanes.
    #[target_feature(enable = "avx2")]
    fn lanes(n: usize) -> __m256i {
        let n = n as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// What every tile of one correlation shares.
    struct Tile<'a> {
        o: usize,
        offsets: &'a [usize],
        input: *const f32,
        out: *mut f32,
        out_row: usize,
    }

    impl Tile<'_> {
        /// Outputs o0..o0 + B × positions p0..p0 + 8·V (with `MASKED` the last vector's lanes
        /// as `mask` keeps them, else all), weights from `w` (`w[k·o + b]` for term k and output o0 + b). Masked
        /// loads and stores throughout: they compile to plain moves where the mask is whole,
        /// and where it is not they never touch the lanes it drops. (`_mm256_loadu_ps` would
        /// also copy through the stack in this crate's test profile, with debug assertions on.)
        ///
        /// # Safety
        /// AVX2 and FMA; every unmasked read and write inside the caller's slices.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn run<const B: usize, const V: usize, const MASKED: bool>(
            &self,
            w: &[f32],
            (o0, p0): (usize, usize),
            mask: __m256i,
        ) {
            let whole = _mm256_set1_epi32(-1);
            let mask_of = |v: usize| if MASKED && v + 1 == V { mask } else { whole };
            let mut acc = [[_mm256_setzero_ps(); V]; B];
            let x = self.input.wrapping_add(p0);
            for (&offset, wk) in self.offsets.iter().zip(w.chunks(self.o)) {
                let xk = x.wrapping_add(offset);
                let mut xs = [_mm256_setzero_ps(); V];
                for (v, xv) in xs.iter_mut().enumerate() {
                    // SAFETY: the caller's bounds, the last vector masked.
                    *xv = unsafe { _mm256_maskload_ps(xk.wrapping_add(8 * v), mask_of(v)) };
                }
                for (row, &wb) in acc.iter_mut().zip(&wk[..B]) {
                    let b = _mm256_set1_ps(wb);
                    for (a, xv) in row.iter_mut().zip(&xs) {
                        *a = _mm256_fmadd_ps(b, *xv, *a);
                    }
                }
            }
            for (b, row) in acc.iter().enumerate() {
                let y = self.out.wrapping_add((o0 + b) * self.out_row + p0);
                for (v, sum) in row.iter().enumerate() {
                    let (y, m) = (y.wrapping_add(8 * v), mask_of(v));
                    // SAFETY: the caller's bounds, the last vector masked.
                    unsafe { _mm256_maskstore_ps(y, m, *sum) };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::correlate`] on AVX-512, in tiles of up to 8 outputs × 48 positions: 24
    /// accumulators, 3 input vectors and a broadcast weight, of AVX-512's 32 registers (8
    /// outputs read each input vector for twice the multiply-adds of 4: 1.1× on the 8-channel
    /// layers, measured with `conv_layers`). The positions left over from 48 take a tile of 1
    /// or 2 vectors whose last is masked; the outputs left over from 8 tiles of 4 and fewer.
    /// Each lane sums its terms as the AVX2 tiles do (in order, one fused multiply-add each,
    /// from zero): the same bits.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; the caller's asserts must hold.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn correlate(
        w: &[f32],
        o: usize,
        offsets: &[usize],
        input: &[f32],
        p: usize,
        out: &mut [f32],
        out_row: usize,
    ) {
        let (input, out) = (input.as_ptr(), out.as_mut_ptr());
        for p0 in (0..p).step_by(48) {
            let left = (p - p0).min(48);
            // Whole vectors, then the last one's lanes (1 to 16).
            let mut masks = [u16::MAX; 3];
            masks[left.div_ceil(16) - 1] = u16::MAX >> ((16 - left % 16) % 16);
            let tile = Tile {
                offsets,
                input: input.wrapping_add(p0),
                out: out.wrapping_add(p0),
                out_row,
                masks,
            };
            let mut o0 = 0;
            while o0 < o {
                let w = &w[o0..];
                let rows = match o - o0 {
                    8.. => 8,
                    4..8 => 4,
                    rows => rows,
                };
                // SAFETY: the tile's outputs lie inside o, its positions (the last vector
                // masked) inside p: the caller's bounds.
                unsafe {
                    match (rows, left.div_ceil(16)) {
                        (8, 3) => tile.run::<8, 3>(w, o, o0),
                        (8, 2) => tile.run::<8, 2>(w, o, o0),
                        (8, _) => tile.run::<8, 1>(w, o, o0),
                        (4, 3) => tile.run::<4, 3>(w, o, o0),
                        (4, 2) => tile.run::<4, 2>(w, o, o0),
                        (4, _) => tile.run::<4, 1>(w, o, o0),
                        (3, 3) => tile.run::<3, 3>(w, o, o0),
                        (3, 2) => tile.run::<3, 2>(w, o, o0),
                        (3, _) => tile.run::<3, 1>(w, o, o0),
                        (2, 3) => tile.run::<2, 3>(w, o, o0),
                        (2, 2) => tile.run::<2, 2>(w, o, o0),
                        (2, _) => tile.run::<2, 1>(w, o, o0),
                        (_, 3) => tile.run::<1, 3>(w, o, o0),
                        (_, 2) => tile.run::<1, 2>(w, o, o0),
                        (_, _) => tile.run::<1, 1>(w, o, o0),
                    }
                }
                o0 += rows;
            }
        }
    }

    weight_grad_tiles!("avx512f,fma", u16, 16, 3);

    /// What [`weight_grad_tiles`] computes with: zeros, masked loads and stores, a broadcast
    /// input value and a fused multiply-add.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    fn zero() -> __m512 {
        _mm512_setzero_ps()
    }

    /// A mask of the first `n` (1 to 16) of 16 lanes.
    fn lanes(n: usize) -> u16 {
        u16::MAX >> (16 - n)
    }

    /// # Safety
    /// The lanes `mask` keeps lie inside an allocation.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    unsafe fn load(at: *const f32, mask: u16) -> __m512 {
        unsafe { _mm512_maskz_loadu_ps(mask, at) }
    }

    /// # Safety
    /// The lanes `mask` keeps lie inside an allocation.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    unsafe fn store(at: *mut f32, mask: u16, v: __m512) {
        unsafe { _mm512_mask_storeu_ps(at, mask, v) }
    }

    /// # Safety
    /// `at` points into an allocation.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    unsafe fn splat(at: *const f32) -> __m512 {
        _mm512_broadcastss_ps(unsafe { _mm_load_ss(at) })
    }

    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }

    /// The positions of one tile (from its first, for every output) and their lane masks.
    struct Tile<'a> {
        offsets: &'a [usize],
        input: *const f32,
        out: *mut f32,
        out_row: usize,
        masks: [u16; 3],
    }

    impl Tile<'_> {
        /// Outputs o0..o0 + B of `o` × the tile's first V vectors of positions, weights from
        /// `w` (`w[k·o + b]` for term k and output o0 + b). Masked loads and stores: a whole
        /// mask costs nothing, and a partial one never touches the lanes it drops.
        ///
        /// # Safety
        /// AVX-512F; every unmasked read and write inside the caller's slices.
        #[target_feature(enable = "avx512f,fma")]
        #[inline]
        unsafe fn run<const B: usize, const V: usize>(&self, w: &[f32], o: usize, o0: usize) {
            let mut acc = [[_mm512_setzero_ps(); V]; B];
            for (&offset, wk) in self.offsets.iter().zip(w.chunks(o)) {
                let xk = self.input.wrapping_add(offset);
                let mut xs = [_mm512_setzero_ps(); V];
                for (v, xv) in xs.iter_mut().enumerate() {
                    // SAFETY: the caller's bounds, the last vector masked.
                    *xv = unsafe { _mm512_maskz_loadu_ps(self.masks[v], xk.wrapping_add(16 * v)) };
                }
                for (row, &wb) in acc.iter_mut().zip(&wk[..B]) {
                    let b = _mm512_set1_ps(wb);
                    for (a, xv) in row.iter_mut().zip(&xs) {
                        *a = _mm512_fmadd_ps(b, *xv, *a);
                    }
                }
            }
            for (b, row) in acc.iter().enumerate() {
                let y = self.out.wrapping_add((o0 + b) * self.out_row);
                for (v, sum) in row.iter().enumerate() {
                    // SAFETY: the caller's bounds, the last vector masked.
                    unsafe { _mm512_mask_storeu_ps(y.wrapping_add(16 * v), self.masks[v], *sum) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::correlate;

    /// The sum of [`correlate`] term by term, in f64.
    fn reference(w: &[f32], o: usize, offsets: &[usize], x: &[f32], p: usize) -> Vec<f64> {
        (0..o * p)
            .map(|i| {
                let (oi, pi) = (i / p, i % p);
                offsets
                    .iter()
                    .enumerate()
                    .map(|(k, &off)| w[k * o + oi] as f64 * x[off + pi] as f64)
                    .sum()
            })
            .collect()
    }

    #[test]
    fn correlate_sums_every_term_of_every_tile_and_tail() {
        // Outputs in tiles of 8 (AVX-512), 4 and fewer, positions in tiles of 24 (AVX2) or 48
        // (AVX-512) and fewer with the last vector masked; the output rows wider than the
        // positions, whose tails stay as they were. AVX-512 and AVX2 (as far as this CPU has
        // them) give the same bits.
        let value =
            |i: usize, seed: usize| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 250.0;
        let cases = [
            (1, 1, 1),
            (4, 24, 3),
            (5, 61, 9),
            (9, 35, 18),
            (3, 8, 72),
            (2, 47, 5),
            (6, 16, 4),
            (4, 64, 9),
            (7, 130, 12),
            (8, 315, 72),
        ];
        for (o, p, terms) in cases {
            let offsets: Vec<usize> = (0..terms).map(|k| (k * 13) % 29).collect();
            let x: Vec<f32> = (0..29 + p).map(|i| value(i, 1)).collect();
            let w: Vec<f32> = (0..terms * o).map(|i| value(i, 2)).collect();
            let row = p + 3;
            let before: Vec<f32> = (0..o * row).map(|i| value(i, 3)).collect();
            let mut outs = Vec::new();
            for level in [2, 1] {
                crate::kernels::limit_vector_width(level);
                let mut out = before.clone();
                let ran = correlate(&w, o, &offsets, &x, p, &mut out, row);
                crate::kernels::limit_vector_width(2);
                if !ran {
                    return; // no AVX2 + FMA here: the caller takes the products
                }
                outs.push(out);
            }
            assert!(outs[0] == outs[1], "o {o} p {p}: AVX-512 and AVX2 differ");
            let (out, expected) = (&outs[0], reference(&w, o, &offsets, &x, p));
            for (i, e) in expected.iter().enumerate() {
                let at = (i / p) * row + i % p;
                let (got, e) = (out[at] as f64, *e);
                assert!((got - e).abs() < 1e-4, "o {o} p {p} at {i}: {got} vs {e}");
            }
            for (i, (&a, &b)) in out.iter().zip(&before).enumerate() {
                if i % row >= p {
                    assert_eq!(a, b, "wrote past the positions");
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn weight_grad_sums_every_position_onto_every_term_and_output() {
        // Outputs in chunks of 32 (AVX-512) or 16 (AVX2) with the last vector masked, terms in
        // tiles of 9 or 6 where they come in runs of three, else one at a time; the input's
        // rows wider than the output's. The sums go on from the values in `out`, and AVX-512
        // and AVX2 (as far as this CPU has them, each called directly: the vector-width limit
        // is global, and other tests set it) give the same bits.
        use super::{avx2, avx512};
        let value =
            |i: usize, seed: usize| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 250.0;
        let cases = [
            (1, 1, (1, 1, 1)),
            (8, 27, (4, 6, 8)),
            (16, 144, (3, 12, 14)),
            (17, 25, (2, 5, 9)),
            (32, 30, (3, 6, 8)),
            (40, 13, (1, 33, 33)),
            (5, 7, (5, 3, 4)),
            (29, 27, (2, 7, 9)),
        ];
        let scattered = |k: usize| (k * 13) % 29;
        // Runs of three consecutive offsets (a 3×3 kernel's rows), but where a run of `terms`
        // is cut short.
        let runs = |k: usize| ((k / 3) * 13) % 29 + k % 3;
        let patterns: [&dyn Fn(usize) -> usize; 2] = [&scattered, &runs];
        for ((o, terms, (r, w, row)), offset) in cases
            .into_iter()
            .flat_map(|case| patterns.map(|p| (case, p)))
        {
            let offsets: Vec<usize> = (0..terms).map(offset).collect();
            let x: Vec<f32> = (0..31 + r * row).map(|i| value(i, 1)).collect();
            let g: Vec<f32> = (0..r * w * o).map(|i| value(i, 2)).collect();
            let before: Vec<f32> = (0..terms * o).map(|i| value(i, 3)).collect();
            let mut outs = Vec::new();
            if std::arch::is_x86_feature_detected!("avx512f") {
                let mut out = before.clone();
                // SAFETY: AVX-512F; the sizes above are those `weight_grad` asserts.
                unsafe { avx512::weight_grad(&g, o, &offsets, &x, (r, w, row), &mut out) };
                outs.push(out);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                let mut out = before.clone();
                // SAFETY: AVX2 and FMA; the sizes above are those `weight_grad` asserts.
                unsafe { avx2::weight_grad(&g, o, &offsets, &x, (r, w, row), &mut out) };
                outs.push(out);
            }
            let Some(first) = outs.first() else {
                return; // no AVX2 + FMA here: the caller takes the products
            };
            assert!(
                outs.iter().all(|out| out == first),
                "o {o} terms {terms}: AVX-512 and AVX2 differ"
            );
            for (i, &got) in first.iter().enumerate() {
                let (k, oi) = (i / o, i % o);
                let positions = (0..r).flat_map(|a| (0..w).map(move |b| (a, b)));
                let want: f64 = before[i] as f64
                    + positions
                        .map(|(a, b)| {
                            x[offsets[k] + a * row + b] as f64 * g[(a * w + b) * o + oi] as f64
                        })
                        .sum::<f64>();
                assert!(
                    (got as f64 - want).abs() < 1e-4,
                    "o {o} at {i}: {got} vs {want}"
                );
            }
        }
    }
}
