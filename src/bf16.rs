//! bf16 matrix products for `train.precision = "bf16"` on the CPU: the operands rounded to bf16
//! (to nearest, ties to even), the products summed in f32, as `torch.autocast("cpu",
//! torch.bfloat16)` runs a matmul through oneDNN on the same instructions. The result stays f32.
//! Two engines ([`Engine`]) read the same packed operands:
//!
//! - **Intel AMX** (Sapphire Rapids and later Xeons): one `TDPBF16PS` multiplies a 16×32 bf16
//!   tile by a 32×16 one into a 16×16 f32 tile, 16K flops, where an AVX-512 core does 64 a cycle
//!   in f32. Each 32×32 block of the output is four accumulator tiles summed over k.
//! - **AVX-512 BF16** (AMD Zen 4 and later, Intel Cooper Lake): one `VDPBF16PS` adds a pair of
//!   bf16 products to each of 16 f32 lanes, 64 flops, twice an f32 FMA's. Each 32×32 block is
//!   four strips of 8 rows, 16 accumulator registers each.
//!
//! A product is packed into tiles (`a` in 16-row blocks, `b` in 16-column blocks of pairs of k,
//! the layout both instructions read).
//!
//! Written by hand because no kept crate does it: `gemm` 0.19 has no bf16 kernel (its f16 one
//! converts to f32), and Rust's AMX intrinsics are unstable, so the five AMX instructions are
//! inline assembly (AVX-512 BF16's are stable intrinsics). The operating system must grant the
//! tiles' state to the process (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, Linux 5.16+), which
//! [`engine`] asks once.

use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Rows and bf16 columns of an operand tile (16 × 64 bytes); an output tile is 16 × 16 f32.
const TILE: usize = 16;
/// The k of one tile product: 32 bf16 values, 64 bytes a row.
const TILE_K: usize = 32;
/// bf16 values in a tile (1 KiB).
const TILE_VALUES: usize = TILE * TILE_K;

/// The instructions that sum bf16 products on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Intel AMX's tiles (`TDPBF16PS`), where the CPU has them and Linux grants them.
    Amx,
    /// AVX-512 BF16's vector dot products (`VDPBF16PS`).
    Avx512,
}

/// The engines this CPU has, fastest first (AMX, then AVX-512 BF16); asked once, on the first
/// call.
pub fn engines() -> &'static [Engine] {
    static ENGINES: OnceLock<Vec<Engine>> = OnceLock::new();
    ENGINES.get_or_init(imp::request)
}

/// The fastest engine this CPU has, the one [`gemm`] uses; `None` without either.
pub fn engine() -> Option<Engine> {
    engines().first().copied()
}

/// Whether this CPU sums bf16 products in hardware ([`engine`]).
pub fn available() -> bool {
    engine().is_some()
}

/// f32 to bf16 bits as `VCVTNE2PS2BF16` converts: rounded to nearest with ties to even
/// (PyTorch's rounding), a NaN stays a (quiet) NaN, and a subnormal becomes a zero of its sign
/// (AMX's products read subnormal bf16 as zero anyway).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = match x.is_subnormal() {
        true => x.to_bits() & 0x8000_0000,
        false => x.to_bits(),
    };
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    match x.is_nan() {
        true => ((bits >> 16) as u16) | 0x40,
        false => rounded,
    }
}

/// The f32 value of bf16 bits (exact).
#[inline(always)]
pub fn from_bf16(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// A matrix operand as (values, row stride, column stride).
pub type Operand<'a> = (&'a [f32], usize, usize);

/// `c (+)= scale · a · b` for an m×k `a` and a k×n `b`, into the m×n `c` at a pointer with a row
/// stride, in bf16 products summed in f32 by [`engine`], split over rayon's threads when
/// `parallel`. Each output element's sum runs over k in one order whatever the threads: the
/// bits do not depend on their number.
///
/// # Safety
/// [`available`] must be true, and `c` valid for writes of every element (m − 1)·row + n it
/// spans, and for reads too when `accumulate` (without it, `c` may be uninitialised).
///
/// # Panics
/// If a stride reaches outside `a` or `b`.
pub unsafe fn gemm(
    dims: [usize; 3],
    a: Operand,
    b: Operand,
    c: (*mut f32, usize),
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    let engine = engine().expect("bf16::gemm needs an engine (the caller's contract)");
    // SAFETY: the caller's contract.
    unsafe { gemm_on(engine, dims, a, b, c, accumulate, scale, parallel) }
}

/// An m×k left operand rounded to bf16 and packed once, for products that reuse it (a
/// convolution's weights, over a batch's images): [`gemm_packed`].
pub struct PackedA {
    tiles: Vec<u16>,
    m: usize,
    k: usize,
}

impl PackedA {
    /// `a` (m×k, at its strides) packed.
    ///
    /// # Panics
    /// If a stride reaches outside `a`, or this CPU has no bf16 engine ([`available`]).
    pub fn new(a: Operand, [m, k]: [usize; 2], parallel: bool) -> PackedA {
        assert!(available(), "bf16 products need AMX or AVX-512 BF16");
        assert!(m == 0 || k == 0 || a.0.len() > (m - 1) * a.1 + (k - 1) * a.2);
        PackedA {
            tiles: pack_a(a, m, k, parallel),
            m,
            k,
        }
    }

    /// Its rows and columns, [m, k].
    pub fn dims(&self) -> [usize; 2] {
        [self.m, self.k]
    }
}

/// [`gemm`] with `a` packed beforehand: `c (+)= scale · a · b` for a k×n `b`.
///
/// # Safety
/// As [`gemm`]'s `c`.
pub unsafe fn gemm_packed(
    a: &PackedA,
    b: Operand,
    n: usize,
    c: (*mut f32, usize),
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    let engine = engine().expect("a PackedA exists only where there is an engine");
    // SAFETY: the caller's contract.
    unsafe { products_on(engine, a, b, n, c, accumulate, scale, parallel) }
}

/// [`gemm`] on a given engine, one of [`engines`] (the tests check each this CPU has).
///
/// # Safety
/// As [`gemm`]'s, with `engine` one of [`engines`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_on(
    engine: Engine,
    [m, k, n]: [usize; 3],
    a: Operand,
    b: Operand,
    c: (*mut f32, usize),
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    let a = PackedA::new(a, [m, k], parallel);
    // SAFETY: the caller's contract.
    unsafe { products_on(engine, &a, b, n, c, accumulate, scale, parallel) }
}

/// The products of [`gemm_on`], `a` packed.
///
/// # Safety
/// As [`gemm_on`]'s.
#[allow(clippy::too_many_arguments)]
unsafe fn products_on(
    engine: Engine,
    packed_a: &PackedA,
    b: Operand,
    n: usize,
    (c, c_row): (*mut f32, usize),
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    assert!(engines().contains(&engine), "{engine:?} is not on this CPU");
    let [m, k] = packed_a.dims();
    let packed_a = &packed_a.tiles;
    assert!(k == 0 || n == 0 || b.0.len() > (k - 1) * b.1 + (n - 1) * b.2);
    assert!(m <= 1 || c_row >= n, "gemm: rows of c overlap");
    if m == 0 || n == 0 {
        return;
    }
    let packed_b = pack_b(b, k, n, parallel);
    let output = Output {
        c: SendPtr(c),
        row: c_row,
        m,
        n,
        accumulate,
        scale,
    };
    // The output's 32×32 blocks, column strip by column strip: a strip's panel of b stays in
    // cache while the panels of a stream past it.
    let (row_blocks, col_blocks) = (m.div_ceil(2 * TILE), n.div_ceil(2 * TILE));
    let blocks: Vec<[usize; 2]> = (0..col_blocks)
        .flat_map(|j| (0..row_blocks).map(move |i| [i, j]))
        .collect();
    let k_tiles = k.div_ceil(TILE_K);
    let run = |blocks: &[[usize; 2]]| {
        // SAFETY: the engine is present; each block writes its own elements of c.
        unsafe {
            match engine {
                Engine::Amx => imp::blocks(blocks, packed_a, &packed_b, k_tiles, &output),
                Engine::Avx512 => imp::dot_blocks(blocks, packed_a, &packed_b, k, &output),
            }
        }
    };
    match parallel {
        true => {
            let per_task = blocks
                .len()
                .div_ceil(4 * rayon::current_num_threads())
                .max(1);
            blocks.par_chunks(per_task).for_each(run);
        }
        false => run(&blocks),
    }
}

/// The destination of [`gemm`].
struct Output {
    c: SendPtr,
    row: usize,
    m: usize,
    n: usize,
    accumulate: bool,
    scale: f32,
}

impl Output {
    /// Where block (i, j) (32×32) is summed: in place in c when it lies whole inside m×n at
    /// scale 1 (`true`, its first element and c's row stride), else in `block` (row stride
    /// 32), which [`Output::write`] then writes out.
    ///
    /// # Safety
    /// As [`gemm`]'s `c`.
    unsafe fn destination(&self, [i, j]: [usize; 2], block: *mut f32) -> (bool, *mut f32, usize) {
        let inside = (i + 1) * 2 * TILE <= self.m && (j + 1) * 2 * TILE <= self.n;
        match self.scale == 1.0 && inside {
            // SAFETY: the block lies inside m×n, so inside c.
            true => (
                true,
                unsafe { self.c.0.add(i * 2 * TILE * self.row + j * 2 * TILE) },
                self.row,
            ),
            false => (false, block, 2 * TILE),
        }
    }

    /// Writes the 32×32 f32 block `block` (row-major) at block (i, j), the part inside m×n.
    ///
    /// # Safety
    /// As [`gemm`]'s `c`.
    unsafe fn write(&self, [i, j]: [usize; 2], block: &[f32; 4 * TILE * TILE]) {
        let (r0, c0) = (i * 2 * TILE, j * 2 * TILE);
        let (rows, cols) = ((self.m - r0).min(2 * TILE), (self.n - c0).min(2 * TILE));
        for r in 0..rows {
            // SAFETY: row r0 + r < m and columns c0..c0 + cols < n are inside c.
            let dst = unsafe { self.c.0.add((r0 + r) * self.row + c0) };
            for (q, &v) in block[r * 2 * TILE..r * 2 * TILE + cols].iter().enumerate() {
                let v = self.scale * v;
                unsafe {
                    let p = dst.add(q);
                    p.write(if self.accumulate { p.read() + v } else { v });
                }
            }
        }
    }
}

/// A raw pointer that rayon's tasks may share: each writes its own elements.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `a` (m×k) as bf16 tiles: 16-row blocks (m padded to a multiple of 32) of k-tiles of 16 rows
/// × 32 values (k padded to a multiple of 32), zeros in the padding.
fn pack_a(a: Operand, m: usize, k: usize, parallel: bool) -> Vec<u16> {
    pack(
        2 * m.div_ceil(2 * TILE),
        k.div_ceil(TILE_K),
        parallel,
        |[rt, kt], tile| {
            // SAFETY: every engine includes AVX-512 BF16 and `PackedA::new` asserts one; its
            // asserts keep a's strides inside it.
            unsafe { imp::a_tile(a, [m, k], [rt * TILE, kt * TILE_K], tile) }
        },
    )
}

/// `b` (k×n) as bf16 tiles in AMX's pair layout: 16-column blocks (n padded to a multiple of
/// 32) of k-tiles, each 16 rows of (b[2p][j], b[2p+1][j]) for its 16 columns j, zeros in the
/// padding.
fn pack_b(b: Operand, k: usize, n: usize, parallel: bool) -> Vec<u16> {
    pack(
        2 * n.div_ceil(2 * TILE),
        k.div_ceil(TILE_K),
        parallel,
        |[ct, kt], tile| {
            // SAFETY: as in `pack_a`, with `products_on`'s asserts for b.
            unsafe { imp::b_tile(b, [k, n], [kt * TILE_K, ct * TILE], tile) }
        },
    )
}

/// `blocks` × `k_tiles` tiles, tile (block, k-tile) written by `fill` (every value of it).
fn pack(
    blocks: usize,
    k_tiles: usize,
    parallel: bool,
    fill: impl Fn([usize; 2], &mut [u16]) + Sync,
) -> Vec<u16> {
    let len = blocks * k_tiles * TILE_VALUES;
    let mut packed = Vec::<u16>::with_capacity(len);
    // Each tile is zeroed where it is filled (in cache, on the task that fills it), not by one
    // thread beforehand.
    let fill = |(t, tile): (usize, &mut [MaybeUninit<u16>])| {
        tile.iter_mut().for_each(|v| {
            v.write(0);
        });
        // SAFETY: every value of the tile was just written.
        let tile = unsafe { &mut *(tile as *mut [MaybeUninit<u16>] as *mut [u16]) };
        fill([t / k_tiles, t % k_tiles], tile)
    };
    let spare = &mut packed.spare_capacity_mut()[..len];
    match parallel {
        true => spare.par_chunks_mut(TILE_VALUES).enumerate().for_each(fill),
        false => spare.chunks_mut(TILE_VALUES).enumerate().for_each(fill),
    }
    // SAFETY: the tiles cover all `len` values, each written above.
    unsafe { packed.set_len(len) };
    packed
}

/// One tile of a (any strides), scalar: rows `r0..r0 + 16`, k `q0..q0 + 32`, row-major.
fn a_tile_scalar((a, rs, cs): Operand, [m, k]: [usize; 2], [r0, q0]: [usize; 2], tile: &mut [u16]) {
    for (r, row) in tile.chunks_mut(TILE_K).enumerate() {
        for (q, v) in row.iter_mut().enumerate() {
            let (i, kk) = (r0 + r, q0 + q);
            *v = match i < m && kk < k {
                true => to_bf16(a[i * rs + kk * cs]),
                false => 0,
            };
        }
    }
}

/// One tile of b (any strides), scalar: k `q0..q0 + 32` as 16 rows of pairs, columns
/// `c0..c0 + 16`.
fn b_tile_scalar((b, rs, cs): Operand, [k, n]: [usize; 2], [q0, c0]: [usize; 2], tile: &mut [u16]) {
    for (t, v) in tile.iter_mut().enumerate() {
        let (p, j, half) = (t / TILE_K, (t % TILE_K) / 2, t % 2);
        let (kk, col) = (q0 + 2 * p + half, c0 + j);
        *v = match kk < k && col < n {
            true => to_bf16(b[kk * rs + col * cs]),
            false => 0,
        };
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::{a_tile_scalar, b_tile_scalar, Engine, Operand, Output, TILE, TILE_K, TILE_VALUES};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// One tile of a (see [`super::pack_a`]) from rows `r0..` and k `q0..`: rows read 32
    /// values at a time where a's rows are contiguous, columns 16 at a time where its columns
    /// are, else value by value.
    ///
    /// # Safety
    /// AVX-512 BF16 must be present; a's strides must stay inside it for every (i < m, kk < k).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn a_tile(a: Operand, [m, k]: [usize; 2], [r0, q0]: [usize; 2], tile: &mut [u16]) {
        let (values, rs, cs) = a;
        let (rows, ks) = (m.saturating_sub(r0).min(TILE), (k - q0).min(TILE_K));
        if rows == 0 {
            return tile.fill(0);
        }
        // SAFETY: the masks keep every load inside rows < m and k < k, and no pointer is formed
        // past them; stores stay in `tile`.
        unsafe {
            if cs == 1 {
                for r in 0..TILE {
                    let bits = match r < rows {
                        true => convert32(values.as_ptr().add((r0 + r) * rs + q0), ks),
                        false => _mm512_setzero_si512(),
                    };
                    _mm512_storeu_si512(tile.as_mut_ptr().add(r * TILE_K).cast(), bits);
                }
            } else if rs == 1 {
                // Column pairs (q, q + 1), each 16 rows: pairs[p][i] = (a[i][2p], a[i][2p+1]).
                let mut pairs = [0u32; TILE * TILE];
                for p in 0..TILE {
                    let column = |q: usize| match q < ks {
                        true => load16(values.as_ptr().add((q0 + q) * cs + r0), rows),
                        false => _mm512_setzero_ps(),
                    };
                    let bits = interleave(column(2 * p), column(2 * p + 1));
                    _mm512_storeu_si512(pairs.as_mut_ptr().add(p * TILE).cast(), bits);
                }
                transpose_into(&pairs, tile);
            } else {
                a_tile_scalar(a, [m, k], [r0, q0], tile);
            }
        }
    }

    /// One tile of b (see [`super::pack_b`]) from k `q0..` and columns `c0..`, as [`a_tile`].
    ///
    /// # Safety
    /// As [`a_tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn b_tile(b: Operand, [k, n]: [usize; 2], [q0, c0]: [usize; 2], tile: &mut [u16]) {
        let (values, rs, cs) = b;
        let (ks, cols) = ((k - q0).min(TILE_K), n.saturating_sub(c0).min(TILE));
        if cols == 0 {
            return tile.fill(0);
        }
        // SAFETY: as in `a_tile`.
        unsafe {
            if cs == 1 {
                for p in 0..TILE {
                    let row = |q: usize| match q < ks {
                        true => load16(values.as_ptr().add((q0 + q) * rs + c0), cols),
                        false => _mm512_setzero_ps(),
                    };
                    let bits = interleave(row(2 * p), row(2 * p + 1));
                    _mm512_storeu_si512(tile.as_mut_ptr().add(p * TILE_K).cast(), bits);
                }
            } else if rs == 1 {
                // Column j's 32 values of k are its 16 pairs: pairs[j][p].
                let mut pairs = [0u32; TILE * TILE];
                for j in 0..TILE {
                    let bits = match j < cols {
                        true => convert32(values.as_ptr().add((c0 + j) * cs + q0), ks),
                        false => _mm512_setzero_si512(),
                    };
                    _mm512_storeu_si512(pairs.as_mut_ptr().add(j * TILE).cast(), bits);
                }
                transpose_into(&pairs, tile);
            } else {
                b_tile_scalar(b, [k, n], [q0, c0], tile);
            }
        }
    }

    /// The first `len` (≤ 16) of 16 f32 at `src`, zeros after.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(src: *const f32, len: usize) -> __m512 {
        // SAFETY: the mask reads only the first `len` values.
        unsafe { _mm512_maskz_loadu_ps(((1u32 << len) - 1) as u16, src) }
    }

    /// The first `len` (≤ 32) of 32 f32 at `src` as bf16 ([`super::to_bf16`]'s rounding),
    /// zeros after.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn convert32(src: *const f32, len: usize) -> __m512i {
        // SAFETY: each masked load reads only values below `len`; the second half's pointer
        // is formed only when it has values.
        unsafe {
            let low = load16(src, len.min(TILE));
            let high = match len > TILE {
                true => load16(src.add(TILE), len - TILE),
                false => _mm512_setzero_ps(),
            };
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(high, low))
        }
    }

    /// (x[i], y[i]) as bf16 pairs, i = 0..16: 16 u32 of x's value in the low half.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn interleave(x: __m512, y: __m512) -> __m512i {
        // SAFETY: both are 512 bits of plain data.
        let halves: __m512i = unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(y, x)) };
        let order = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        _mm512_permutexvar_epi16(order, halves)
    }

    /// `tile`'s 16 rows of 16 u32 (bf16 pairs) from `pairs` transposed.
    #[inline]
    fn transpose_into(pairs: &[u32; TILE * TILE], tile: &mut [u16]) {
        for (r, row) in tile.chunks_exact_mut(TILE_K).enumerate() {
            for (c, pair) in row.chunks_exact_mut(2).enumerate() {
                let v = pairs[c * TILE + r];
                pair[0] = v as u16;
                pair[1] = (v >> 16) as u16;
            }
        }
    }

    /// CPUID leaf 7's EDX bits for AMX-BF16 and AMX-TILE.
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    /// Linux's `arch_prctl` request for an extended state component, and AMX's tile data.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;

    /// AMX where the CPU has it and Linux grants it, then AVX-512 BF16; AMX needs AVX-512
    /// BF16 too, which the packers use.
    pub fn request() -> Vec<Engine> {
        let avx512 = is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512bf16");
        if !avx512 {
            return Vec::new();
        }
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let amx = leaf7.edx & (AMX_BF16 | AMX_TILE) == AMX_BF16 | AMX_TILE
            // SAFETY: a system call with two integer arguments; it fails cleanly where
            // unsupported.
            && unsafe {
                libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
            };
        match amx {
            true => vec![Engine::Amx, Engine::Avx512],
            false => vec![Engine::Avx512],
        }
    }

    /// The tile configuration (`LDTILECFG`'s 64 bytes): palette 1, tiles 0-7 of 16 rows × 64
    /// bytes; the reserved bytes and tiles 8-15 must be zero.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// The output blocks `blocks` ([row block, column block] of 32×32) of the product of the
    /// packed operands, each summed over `k_tiles` tiles of k into tiles 0-3 (tiles 4-5 hold
    /// a's two row tiles, 6-7 b's two column tiles), then written to `out`.
    ///
    /// # Safety
    /// AMX must be granted ([`super::engine`]); `out` as [`super::gemm`]'s destination.
    pub unsafe fn blocks(
        blocks: &[[usize; 2]],
        a: &[u16],
        b: &[u16],
        k_tiles: usize,
        out: &Output,
    ) {
        let panel = k_tiles * TILE_VALUES;
        let mut block = [0f32; 4 * TILE * TILE];
        // SAFETY: the configuration is valid (palette 1, tiles 0-7); every load reads one
        // packed tile of 1 KiB inside `a` or `b` (the asserts), or a whole block of c inside
        // m×n; every store writes 16 rows of 64 bytes inside `block` or such a block of c. One
        // asm block per output block declares all eight tiles clobbered and keeps them to
        // itself; the tiles are released before returning.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
            for &[i, j] in blocks {
                let (a0, b0) = (2 * i * panel, 2 * j * panel);
                assert!(a0 + 2 * panel <= a.len() && b0 + 2 * panel <= b.len());
                let (a0, b0) = (a.as_ptr().add(a0), b.as_ptr().add(b0));
                let (direct, c, row) = out.destination([i, j], block.as_mut_ptr());
                // tmm0-3: the block's four 16×16 quarters (c00 c01 / c10 c11, the right ones
                // 64 bytes on); tmm4-5: a's two row tiles; tmm6-7: b's two column tiles.
                asm!(
                    "test {load:e}, {load:e}",
                    "jnz 2f",
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    "jmp 3f",
                    "2:",
                    "tileloadd tmm0, [{c0} + {c_stride}*1]",
                    "tileloadd tmm1, [{c0} + {c_stride}*1 + 64]",
                    "tileloadd tmm2, [{c1} + {c_stride}*1]",
                    "tileloadd tmm3, [{c1} + {c_stride}*1 + 64]",
                    "3:",
                    "test {t}, {t}",
                    "jz 5f",
                    "4:",
                    "tileloadd tmm4, [{a0} + {stride}*1]",
                    "tileloadd tmm5, [{a1} + {stride}*1]",
                    "tileloadd tmm6, [{b0} + {stride}*1]",
                    "tileloadd tmm7, [{b1} + {stride}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "add {a0}, 1024",
                    "add {a1}, 1024",
                    "add {b0}, 1024",
                    "add {b1}, 1024",
                    "dec {t}",
                    "jnz 4b",
                    "5:",
                    "tilestored [{c0} + {c_stride}*1], tmm0",
                    "tilestored [{c0} + {c_stride}*1 + 64], tmm1",
                    "tilestored [{c1} + {c_stride}*1], tmm2",
                    "tilestored [{c1} + {c_stride}*1 + 64], tmm3",
                    load = in(reg) (direct && out.accumulate) as u32,
                    c0 = in(reg) c,
                    c1 = in(reg) c.add(TILE * row),
                    c_stride = in(reg) 4 * row,
                    a0 = inout(reg) a0 => _,
                    a1 = inout(reg) a0.add(panel) => _,
                    b0 = inout(reg) b0 => _,
                    b1 = inout(reg) b0.add(panel) => _,
                    stride = in(reg) 2 * TILE_K,
                    t = inout(reg) k_tiles => _,
                    out("tmm0") _,
                    out("tmm1") _,
                    out("tmm2") _,
                    out("tmm3") _,
                    out("tmm4") _,
                    out("tmm5") _,
                    out("tmm6") _,
                    out("tmm7") _,
                    options(nostack)
                );
                if !direct {
                    out.write([i, j], &block);
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// One strip of an output block: `ROWS` rows of a, from `a_rows` (16 u32 pairs of k a row,
    /// the next k-tile 256 u32 on), times `HALVES` of b's 16-column tile panels (k-tiles of 16
    /// rows of 16 pairs, 512 u16 each), summed over `pairs` pairs of k into `ROWS` rows ×
    /// 16·`HALVES` f32 of c at `(c, row)`, added to what is there when `load`. ROWS × HALVES
    /// = 16 accumulator registers.
    ///
    /// # Safety
    /// AVX-512 BF16 must be present; the operands must hold ⌈pairs / 16⌉ tiles from the
    /// pointers given, and c `ROWS` rows of 16·`HALVES` values at its row stride.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn strip_product<const ROWS: usize, const HALVES: usize>(
        a_rows: *const i32,
        b: [*const u16; HALVES],
        pairs: usize,
        (c, row): (*mut f32, usize),
        load: bool,
    ) {
        // SAFETY: the caller's contract; every offset below stays inside one tile.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); HALVES]; ROWS];
            if load {
                for (r, acc) in acc.iter_mut().enumerate() {
                    for (h, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_loadu_ps(c.add(r * row + h * TILE));
                    }
                }
            }
            for t in 0..pairs.div_ceil(TILE) {
                let a = a_rows.add(t * TILE * TILE);
                // The last tile's pairs past k are zeros: skipped.
                for p in 0..(pairs - t * TILE).min(TILE) {
                    let x: [__m512bh; HALVES] = std::array::from_fn(|h| {
                        let at = b[h].add(t * TILE_VALUES + p * TILE_K);
                        std::mem::transmute(_mm512_loadu_si512(at.cast()))
                    });
                    for (q, acc) in acc.iter_mut().enumerate() {
                        let y: __m512bh =
                            std::mem::transmute(_mm512_set1_epi32(*a.add(q * TILE + p)));
                        for (acc, x) in acc.iter_mut().zip(x) {
                            *acc = _mm512_dpbf16_ps(*acc, y, x);
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (h, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(c.add(r * row + h * TILE), *acc);
                }
            }
        }
    }

    /// As [`blocks`], summed by AVX-512 BF16's `VDPBF16PS`: each 32×32 block as strips of 8
    /// rows × 32 columns, or of 16 rows × 16 columns where the block's right half lies past n,
    /// 16 accumulator registers a strip; for each pair of k, a strip loads b's 16-column
    /// vectors of pairs once and broadcasts each row's pair of a against them. Strips past m,
    /// and pairs past k, are skipped.
    ///
    /// # Safety
    /// AVX-512 BF16 must be present; `out` as [`super::gemm`]'s destination.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dot_blocks(blocks: &[[usize; 2]], a: &[u16], b: &[u16], k: usize, out: &Output) {
        let panel = k.div_ceil(TILE_K) * TILE_VALUES;
        let pairs = k.div_ceil(2);
        let mut block = [0f32; 4 * TILE * TILE];
        for &[i, j] in blocks {
            let (a0, b0) = (2 * i * panel, 2 * j * panel);
            assert!(a0 + 2 * panel <= a.len() && b0 + 2 * panel <= b.len());
            let rows = (out.m - i * 2 * TILE).min(2 * TILE);
            let cols = (out.n - j * 2 * TILE).min(2 * TILE);
            // SAFETY: the caller's contract.
            let (direct, c, row) = unsafe { out.destination([i, j], block.as_mut_ptr()) };
            let load = direct && out.accumulate;
            // SAFETY: a's row tiles and b's two column tiles span `panel` values each at the
            // offsets asserted above; each strip's rows of c lie inside c or `block`.
            unsafe {
                let a_tile = |r: usize| {
                    a.as_ptr()
                        .add(a0)
                        .cast::<i32>()
                        .add(r / TILE * panel / 2 + r % TILE * TILE)
                };
                let (left, right) = (b.as_ptr().add(b0), b.as_ptr().add(b0 + panel));
                match cols > TILE {
                    true => {
                        for r in (0..rows).step_by(8) {
                            let c = c.add(r * row);
                            strip_product::<8, 2>(a_tile(r), [left, right], pairs, (c, row), load);
                        }
                    }
                    false => {
                        for r in (0..rows).step_by(TILE) {
                            let c = c.add(r * row);
                            strip_product::<16, 1>(a_tile(r), [left], pairs, (c, row), load);
                        }
                    }
                }
            }
            if !direct {
                // SAFETY: as the caller's contract.
                unsafe { out.write([i, j], &block) };
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    use super::{Operand, Output};

    pub fn request() -> Vec<super::Engine> {
        Vec::new()
    }

    pub unsafe fn a_tile(a: Operand, size: [usize; 2], at: [usize; 2], tile: &mut [u16]) {
        super::a_tile_scalar(a, size, at, tile)
    }

    pub unsafe fn b_tile(b: Operand, size: [usize; 2], at: [usize; 2], tile: &mut [u16]) {
        super::b_tile_scalar(b, size, at, tile)
    }

    pub unsafe fn blocks(_: &[[usize; 2]], _: &[u16], _: &[u16], _: usize, _: &Output) {
        unreachable!("AMX is used only on x86-64 Linux")
    }

    pub unsafe fn dot_blocks(_: &[[usize; 2]], _: &[u16], _: &[u16], _: usize, _: &Output) {
        unreachable!("AVX-512 BF16 is used only on x86-64 Linux")
    }
}
