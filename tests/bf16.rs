//! The bf16 products (`src/bf16.rs`) against f64 sums of the bf16-rounded operands, on each
//! engine this CPU has (AMX, AVX-512 BF16). On a CPU with neither each test says so and checks
//! nothing but the rounding.

use selfsup::bf16;

/// A deterministic pseudo-random f32 in (−2, 2), with a spread of magnitudes.
fn value(i: usize, seed: u64) -> f32 {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    ((x % 40_001) as f32 / 10_000.0 - 2.0) * if x % 7 == 0 { 1e-3 } else { 1.0 }
}

#[test]
fn bf16_rounding_is_to_nearest_even() {
    assert_eq!(bf16::to_bf16(1.0), 0x3f80);
    // 1 + 2⁻⁸ is halfway between two bf16s: ties to the even one (1.0); just above rounds up.
    assert_eq!(bf16::to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
    assert_eq!(bf16::to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    // 1 + 3·2⁻⁸ ties to the even 1 + 2⁻⁶ (0x3f82).
    assert_eq!(bf16::to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(bf16::to_bf16(-2.5), 0xc020);
    assert!(bf16::from_bf16(bf16::to_bf16(f32::NAN)).is_nan());
    assert_eq!(bf16::to_bf16(f32::INFINITY), 0x7f80);
    // The largest f32 rounds to infinity, as PyTorch's cast does.
    assert_eq!(bf16::to_bf16(f32::MAX), 0x7f80);
    // Subnormals become zeros of their sign, as AMX's conversion makes them.
    assert_eq!(bf16::to_bf16(f32::from_bits(1)), 0);
    assert_eq!(bf16::to_bf16(-f32::from_bits(0x0040_0000)), 0x8000);
}

/// The packers' vector conversion rounds as `to_bf16`: ties, NaN, infinities, subnormals and
/// f32's largest, read through a product with 1 (exact) from each operand in each layout.
#[test]
fn packed_operands_round_as_to_bf16() {
    if !bf16::available() {
        eprintln!("no bf16 engine on this CPU: nothing to check");
        return;
    }
    let specials = [
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        f32::from_bits(0x3f80_8001),
        -2.5,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::from_bits(1),
        f32::MIN_POSITIVE,
        1e-3,
        f32::NAN,
    ];
    let len = specials.len();
    let one = [1.0f32];
    let want: Vec<u32> = specials
        .iter()
        .map(|&x| (bf16::from_bf16(bf16::to_bf16(x))).to_bits())
        .collect();
    // specials through each packer's two vector paths: a read by rows (column stride 1) and by
    // columns (row stride 1, column stride len), b by rows (column stride 1) and by columns
    // (row stride 1, column stride 2 over every other value).
    let spaced: Vec<f32> = specials.iter().flat_map(|&x| [x, 0.0]).collect();
    let pairs = [
        ((&specials[..], 1, 1), (&one[..], 1, 1), [len, 1, 1]),
        ((&specials[..], 1, len), (&one[..], 1, 1), [len, 1, 1]),
        ((&one[..], 1, 1), (&specials[..], len, 1), [1, 1, len]),
        ((&one[..], 1, 1), (&spaced[..], 1, 2), [1, 1, len]),
    ];
    for (&engine, (a, b, dims)) in bf16::engines().iter().flat_map(|e| pairs.map(|p| (e, p))) {
        let rows = dims[0];
        let mut c = vec![0f32; len];
        let c_row = len / rows;
        unsafe {
            bf16::gemm_on(
                engine,
                dims,
                a,
                b,
                (c.as_mut_ptr(), c_row),
                false,
                1.0,
                false,
            )
        };
        let got: Vec<u32> = c.iter().map(|v| v.to_bits()).collect();
        for ((g, w), x) in got.iter().zip(&want).zip(&specials) {
            let (g, w) = (f32::from_bits(*g), f32::from_bits(*w));
            assert!(
                g == w || (g.is_nan() && w.is_nan()),
                "{x:e}: {g:e} against {w:e}"
            );
        }
    }
}

/// Layouts of an operand: row-major, column-major, or every other value of a row-major one
/// (neither stride 1).
#[derive(Clone, Copy, Debug)]
enum Layout {
    Rows,
    Columns,
    Spaced,
}

/// (values, row stride, column stride) of a rows×cols operand whose element (i, j) is
/// `value(i·cols + j, seed)`, in `layout`.
fn operand(rows: usize, cols: usize, seed: u64, layout: Layout) -> (Vec<f32>, usize, usize) {
    let at = |i: usize, j: usize| value(i * cols + j, seed);
    match layout {
        Layout::Rows => (
            (0..rows * cols).map(|t| at(t / cols, t % cols)).collect(),
            cols,
            1,
        ),
        Layout::Columns => (
            (0..rows * cols).map(|t| at(t % rows, t / rows)).collect(),
            1,
            rows,
        ),
        Layout::Spaced => (
            (0..2 * rows * cols)
                .map(|t| at(t / (2 * cols), (t % (2 * cols)) / 2))
                .collect(),
            2 * cols,
            2,
        ),
    }
}

/// `c (+)= scale·a·b` through `bf16::gemm_on` each engine for operands in the given layouts,
/// against f64 sums of the bf16-rounded operands.
fn check(dims: [usize; 3], layouts: [Layout; 2], accumulate: bool, scale: f32, parallel: bool) {
    for &engine in bf16::engines() {
        check_on(engine, dims, layouts, accumulate, scale, parallel);
    }
}

fn check_on(
    engine: bf16::Engine,
    dims: [usize; 3],
    layouts: [Layout; 2],
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    let [m, k, n] = dims;
    let (a, ar, ac) = operand(m, k, 1, layouts[0]);
    let (b, br, bc) = operand(k, n, 2, layouts[1]);
    let (a_op, b_op) = ((&a[..], ar, ac), (&b[..], br, bc));
    // c with a row stride of n + 3 (its gaps must stay untouched).
    let row = n + 3;
    let start: Vec<f32> = (0..m * row).map(|i| value(i, 3)).collect();
    let mut c = start.clone();
    unsafe {
        bf16::gemm_on(
            engine,
            dims,
            a_op,
            b_op,
            (c.as_mut_ptr(), row),
            accumulate,
            scale,
            parallel,
        );
    }
    let round = |x: f32| bf16::from_bf16(bf16::to_bf16(x)) as f64;
    for i in 0..m {
        for j in 0..row {
            let got = c[i * row + j];
            if j >= n {
                assert_eq!(
                    got.to_bits(),
                    start[i * row + j].to_bits(),
                    "gap ({i}, {j})"
                );
                continue;
            }
            let (mut sum, mut magnitude) = (0f64, 0f64);
            for q in 0..k {
                let x = round(a_op.0[i * a_op.1 + q * a_op.2]);
                let y = round(b_op.0[q * b_op.1 + j * b_op.2]);
                sum += x * y;
                magnitude += (x * y).abs();
            }
            let want = scale as f64 * sum
                + if accumulate {
                    start[i * row + j] as f64
                } else {
                    0.0
                };
            // f32 sums of k products: a few f32 ulps of the magnitude per term.
            let tolerance =
                4.0 * f32::EPSILON as f64 * (scale as f64 * magnitude + 1.0) * (k as f64).sqrt();
            assert!(
                (got as f64 - want).abs() <= tolerance,
                "{engine:?} {dims:?} at ({i}, {j}): {got} against {want} (±{tolerance})"
            );
        }
    }
}

#[test]
fn products_are_bf16_products_summed_in_f32() {
    if !bf16::available() {
        eprintln!("no bf16 engine on this CPU: the products are not checked");
        return;
    }
    // Whole tiles (summed in place at scale 1), ragged edges in each dimension, k below one
    // tile, one row, every layout of each operand.
    use Layout::*;
    for (dims, layouts) in [
        ([64, 64, 64], [Rows, Rows]),
        ([64, 96, 32], [Columns, Columns]),
        ([33, 70, 47], [Rows, Columns]),
        ([33, 70, 47], [Columns, Rows]),
        ([5, 3, 17], [Spaced, Rows]),
        ([1, 200, 1], [Columns, Spaced]),
        ([100, 31, 40], [Spaced, Spaced]),
    ] {
        for accumulate in [false, true] {
            for scale in [1.0, 0.5] {
                check(dims, layouts, accumulate, scale, false);
            }
        }
        check(dims, layouts, true, 1.0, true);
    }
}

#[test]
fn product_bits_do_not_depend_on_threads() {
    if !bf16::available() {
        eprintln!("no bf16 engine on this CPU: nothing to check");
        return;
    }
    let [m, k, n] = [130, 300, 90];
    let a: Vec<f32> = (0..m * k).map(|i| value(i, 4)).collect();
    let b: Vec<f32> = (0..k * n).map(|i| value(i, 5)).collect();
    let run = |engine, parallel| {
        let mut c = vec![0f32; m * n];
        unsafe {
            bf16::gemm_on(
                engine,
                [m, k, n],
                (&a, k, 1),
                (&b, n, 1),
                (c.as_mut_ptr(), n),
                false,
                1.0,
                parallel,
            )
        };
        c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    for &engine in bf16::engines() {
        assert_eq!(run(engine, false), run(engine, true), "{engine:?}");
    }
}
