//! The fused CPU kernels (`selfsup::kernels`) against burn's own ops: values, running statistics
//! and gradients within 1e-5, on contiguous and strided inputs.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, LayerNorm, LayerNormConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use selfsup::kernels;

/// Values drawn from U(-1, 1) · `scale` + `offset`: an offset mean tests the variance's precision.
fn random<const D: usize>(shape: [usize; D], seed: u64, scale: f32, offset: f32) -> TensorData {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale + offset)
        .collect();
    TensorData::new(data, shape)
}

fn assert_close<const D: usize>(what: &str, got: Tensor<D>, want: Tensor<D>) {
    assert_within(1e-5, what, got, want);
}

/// `got` within `bound` of `want`, relative to |want| where that exceeds 1.
fn assert_within<const D: usize>(bound: f32, what: &str, got: Tensor<D>, want: Tensor<D>) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let values = |t: Tensor<D>| t.into_data().try_to_vec::<f32>().unwrap();
    let (got, want) = (values(got), values(want));
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(
            0f32,
            |worst, e| if e.is_nan() || e > worst { e } else { worst },
        );
    // A NaN anywhere fails (it never compares below the bound).
    assert!(worst < bound, "{what}: differs from burn's op by {worst:e}");
}

/// A batch norm layer with non-trivial γ and β on `device`.
fn layer(channels: usize, device: &Device) -> BatchNorm {
    let mut bn = BatchNormConfig::new(channels).init(device);
    bn.gamma = Param::from_tensor(Tensor::from_data(random([channels], 7, 0.5, 1.0), device));
    bn.beta = Param::from_tensor(Tensor::from_data(random([channels], 8, 0.5, 0.0), device));
    bn
}

/// Runs batch norm both ways on `x` (made strided when `permuted`) with a loss that weights
/// every output differently, and compares outputs, running statistics and gradients.
fn check_batch_norm<const D: usize>(shape: [usize; D], permuted: bool) {
    check_batch_norm_of(shape, permuted, 2.0, 3.0, false);
    check_batch_norm_of(shape, permuted, 2.0, 3.0, true);
}

/// [`check_batch_norm`] on values U(-1, 1)·`scale` + `offset`; with `relu`, the fused
/// `kernels::batch_norm_relu` against burn's `relu(bn.forward(x))` (β spread around zero, so
/// that about half the outputs are cut).
fn check_batch_norm_of<const D: usize>(
    shape: [usize; D],
    permuted: bool,
    scale: f32,
    offset: f32,
    relu: bool,
) {
    let device = Device::flex().autodiff();
    let x = Tensor::<D>::from_data(random(shape, 1, scale, offset), &device).require_grad();
    let weights = Tensor::<D>::from_data(random(shape, 2, 1.0, 0.0), &device);
    let run = |fused: bool| {
        let bn = layer(shape[1], &device);
        // The same values through a transposed copy: a strided view of it.
        let input = match permuted {
            true => x
                .clone()
                .swap_dims(D - 1, D - 2)
                .mul_scalar(1.0)
                .swap_dims(D - 1, D - 2),
            false => x.clone(),
        };
        let output = match (fused, relu) {
            (true, false) => kernels::batch_norm(&bn, input),
            (true, true) => kernels::batch_norm_relu(&bn, input),
            (false, false) => bn.forward(input),
            (false, true) => burn::tensor::activation::relu(bn.forward(input)),
        };
        let grads = (output.clone() * weights.clone()).sum().backward();
        let grad = |t: Tensor<1>| t.grad(&grads).unwrap();
        (
            output,
            x.grad(&grads).unwrap(),
            grad(bn.gamma.val()),
            grad(bn.beta.val()),
            bn.running_mean.value(),
            bn.running_var.value(),
        )
    };
    let (fused, reference) = (run(true), run(false));
    assert_close("output", fused.0, reference.0);
    assert_close("x grad", fused.1, reference.1);
    assert_close("gamma grad", fused.2, reference.2);
    assert_close("beta grad", fused.3, reference.3);
    assert_close("running mean", fused.4, reference.4);
    assert_close("running var", fused.5, reference.5);
}

#[test]
fn batch_norm_matches_burn_on_images() {
    check_batch_norm([6, 5, 7, 3], false);
}

#[test]
fn batch_norm_matches_burn_on_strided_images() {
    check_batch_norm([4, 3, 5, 6], true);
}

#[test]
fn batch_norm_matches_burn_on_feature_vectors_and_sequences() {
    check_batch_norm([16, 12], false);
    check_batch_norm([4, 6, 10], false);
}

#[test]
fn batch_norm_keeps_its_precision_when_the_mean_dwarfs_the_spread() {
    // Mean 20 standard deviations from zero over 4,096 positions a channel: E[x²] − μ² in f32
    // would lose the variance's leading digits.
    check_batch_norm_of([2, 4, 64, 64], false, 0.5, 10.0, false);
    check_batch_norm_of([2, 4, 64, 64], false, 0.5, 10.0, true);
}

#[test]
fn batch_norm_outside_training_is_burns_forward() {
    // No autodiff: the running statistics normalise, as burn's own forward does.
    let device = Device::flex();
    let bn = layer(5, &device);
    let x = Tensor::<4>::from_data(random([2, 5, 3, 3], 3, 1.0, 0.0), &device);
    assert_close(
        "eval output",
        kernels::batch_norm(&bn, x.clone()),
        bn.forward(x),
    );
}

/// Split batch norm (MoCo's shuffle-BN on one device) against batch norm run on each group
/// `i ≡ g (mod groups)` on its own: outputs, gradients of x and γ (shared by the groups: the sum
/// of theirs), running statistics (the groups' mean).
#[test]
fn split_batch_norm_normalises_each_group_on_its_own() {
    let device = Device::flex().autodiff();
    let (n, c, groups) = (8, 3, 4);
    let x = Tensor::<4>::from_data(random([n, c, 3, 2], 9, 1.0, 0.3), &device);
    let weights = Tensor::<4>::from_data(random([n, c, 3, 2], 10, 1.0, 0.0), &device);
    let loss = |y: Tensor<4>| (y * weights.clone()).sum().backward();

    let split = layer(c, &device);
    let x1 = x.clone().require_grad();
    let out = kernels::split_batch_norm(&split, x1.clone(), groups);
    let grads = loss(out.clone());

    let x2 = x.require_grad();
    let alone: Vec<BatchNorm> = (0..groups).map(|_| layer(c, &device)).collect();
    let mut rows = vec![None; n];
    for (g, bn) in alone.iter().enumerate() {
        let members: Vec<i64> = (g..n).step_by(groups).map(|i| i as i64).collect();
        let index = Tensor::from_data(TensorData::new(members.clone(), [n / groups]), &device);
        let y = kernels::batch_norm(bn, x2.clone().select(0, index));
        for (k, &i) in members.iter().enumerate() {
            rows[i as usize] = Some(y.clone().narrow(0, k, 1));
        }
    }
    let expected = Tensor::cat(rows.into_iter().map(Option::unwrap).collect(), 0);
    assert_close("split output", out, expected.clone());
    let expected_grads = loss(expected);
    assert_close(
        "split x grad",
        x1.grad(&grads).unwrap(),
        x2.grad(&expected_grads).unwrap(),
    );
    let sum = |f: &dyn Fn(&BatchNorm) -> Tensor<1>| {
        Tensor::stack::<2>(alone.iter().map(f).collect(), 0)
            .sum_dim(0)
            .reshape([c])
    };
    let gamma_grads = sum(&|bn| bn.gamma.val().grad(&expected_grads).unwrap());
    assert_close(
        "split gamma grad",
        split.gamma.val().grad(&grads).unwrap(),
        gamma_grads,
    );
    let mean = |f: &dyn Fn(&BatchNorm) -> Tensor<1>| sum(f).div_scalar(groups as f64);
    assert_close(
        "split running mean",
        split.running_mean.value_sync(),
        mean(&|bn| bn.running_mean.value_sync()),
    );
    assert_close(
        "split running var",
        split.running_var.value_sync(),
        mean(&|bn| bn.running_var.value_sync()),
    );
}

/// The fused split batch norm + ReLU (MoCo's ResNet) against ReLU after split batch norm:
/// outputs and the gradients of x, γ and β.
#[test]
fn split_batch_norm_relu_is_relu_after_split_batch_norm() {
    let device = Device::flex().autodiff();
    let (shape, groups) = ([8, 3, 4, 5], 4);
    let x = Tensor::<4>::from_data(random(shape, 11, 1.0, 0.3), &device);
    let weights = Tensor::<4>::from_data(random(shape, 12, 1.0, 0.0), &device);
    let run = |fused: bool| {
        let bn = layer(shape[1], &device);
        let x = x.clone().require_grad();
        let y = match fused {
            true => kernels::split_batch_norm_relu(&bn, x.clone(), groups),
            false => kernels::relu(kernels::split_batch_norm(&bn, x.clone(), groups)),
        };
        let grads = (y.clone() * weights.clone()).sum().backward();
        let grad = |t: Tensor<1>| t.grad(&grads).unwrap();
        (
            y,
            x.grad(&grads).unwrap(),
            grad(bn.gamma.val()),
            grad(bn.beta.val()),
        )
    };
    let (fused, reference) = (run(true), run(false));
    let cut: f32 = fused.0.clone().equal_elem(0.0).float().sum().into_scalar();
    assert!(
        (100.0..380.0).contains(&cut),
        "{cut} of 480 outputs cut: the ReLU is not exercised"
    );
    assert_close("output", fused.0, reference.0);
    assert_close("x grad", fused.1, reference.1);
    assert_close("gamma grad", fused.2, reference.2);
    assert_close("beta grad", fused.3, reference.3);
}

/// A CIFAR ResNet's convolution of `channels`: 3×3 at stride 1, padding 1, no bias.
fn resnet_conv(channels: [usize; 2], device: &Device) -> Conv2d {
    let same = PaddingConfig2d::Explicit(1, 1, 1, 1);
    convolution(channels, [3, 3], [1, 1], same, [1, 1], false, device)
}

/// A convolution of `channels` with a random weight (and bias when `bias`) on `device`.
fn convolution(
    [c, co]: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: PaddingConfig2d,
    dilation: [usize; 2],
    bias: bool,
    device: &Device,
) -> Conv2d {
    let mut conv = Conv2dConfig::new([c, co], kernel)
        .with_stride(stride)
        .with_padding(padding)
        .with_dilation(dilation)
        .with_bias(bias)
        .init(device);
    conv.weight = Param::from_tensor(Tensor::from_data(
        random([co, c, kernel[0], kernel[1]], 5, 0.5, 0.0),
        device,
    ));
    if bias {
        conv.bias = Some(Param::from_tensor(Tensor::from_data(
            random([co], 6, 0.5, 0.0),
            device,
        )));
    }
    conv
}

/// Runs a convolution both ways on an `[N, C, H, W]` input of `input` shape, with a loss that
/// weights every output differently, and compares outputs and the gradients of x, weight, bias
/// within 1e-5 ([`check_conv_within`]).
fn check_conv(
    input: [usize; 4],
    co: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
    bias: bool,
) {
    check_conv_within(1e-5, input, co, kernel, stride, padding, dilation, bias);
}

/// [`check_conv`] within `bound`.
#[allow(clippy::too_many_arguments)]
fn check_conv_within(
    bound: f32,
    input: [usize; 4],
    co: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    [top, left, bottom, right]: [usize; 4],
    dilation: [usize; 2],
    bias: bool,
) {
    let padding = PaddingConfig2d::Explicit(top, left, bottom, right);
    let device = Device::flex().autodiff();
    let x = Tensor::<4>::from_data(random(input, 1, 1.0, 0.5), &device).require_grad();
    let run = |fused: bool| {
        let conv = convolution(
            [input[1], co],
            kernel,
            stride,
            padding.clone(),
            dilation,
            bias,
            &device,
        );
        let output = match fused {
            true => kernels::conv2d(&conv, x.clone()),
            false => conv.forward(x.clone()),
        };
        let weights = Tensor::<4>::from_data(random(output.dims(), 2, 1.0, 0.0), &device);
        let grads = (output.clone() * weights).sum().backward();
        let bias_grad = conv.bias.as_ref().map(|b| b.val().grad(&grads).unwrap());
        (
            output,
            x.grad(&grads).unwrap(),
            conv.weight.val().grad(&grads).unwrap(),
            bias_grad,
        )
    };
    let (fused, reference) = (run(true), run(false));
    assert_within(bound, "output", fused.0, reference.0);
    assert_within(bound, "x grad", fused.1, reference.1);
    assert_within(bound, "weight grad", fused.2, reference.2);
    if let (Some(fused), Some(reference)) = (fused.3, reference.3) {
        assert_within(bound, "bias grad", fused, reference);
    }
}

#[test]
fn conv_matches_burn_for_resnet_layers() {
    // 3×3 at stride 1 (by columns, and tap by tap on a grid wide enough) and 2, the 1×1
    // downsample, the ImageNet stem.
    check_conv([3, 4, 9, 5], 5, [3, 3], [1, 1], [1; 4], [1, 1], false);
    check_conv([3, 4, 5, 18], 5, [3, 3], [1, 1], [1; 4], [1, 1], false);
    check_conv([3, 4, 9, 8], 6, [3, 3], [2, 2], [1; 4], [1, 1], false);
    check_conv([3, 4, 9, 8], 6, [1, 1], [2, 2], [0; 4], [1, 1], false);
    check_conv([2, 3, 16, 15], 4, [7, 7], [2, 2], [3; 4], [1, 1], false);
}

#[test]
fn conv_matches_burn_for_wide_layers_on_small_grids() {
    // Channels-last on AVX-512 where the outputs fill whole vectors (48 → 48 at 6 px, 96 at
    // stride 2 with its 1×1 downsample left to the other paths, 96 → 96 at 3 px in groups of
    // images with a partial last group), a 3×2 kernel with asymmetric padding whose gradients
    // run channels-last over 196 positions (more than a block of 128 terms), the same with
    // dilation (its gradients by columns), and 40 outputs left to the other paths.
    check_conv([5, 48, 6, 6], 48, [3, 3], [1, 1], [1; 4], [1, 1], false);
    check_conv([5, 48, 6, 6], 96, [3, 3], [2, 2], [1; 4], [1, 1], false);
    check_conv([5, 48, 6, 6], 96, [1, 1], [2, 2], [0; 4], [1, 1], false);
    // 864-term sums (96 channels × 9 taps), summed in blocks of 128 and burn's in one run:
    // their roundings differ by up to 1.1e-5 of an output here.
    check_conv_within(
        3e-5,
        [37, 96, 3, 3],
        96,
        [3, 3],
        [1, 1],
        [1; 4],
        [1, 1],
        false,
    );
    check_conv(
        [3, 32, 14, 13],
        16,
        [3, 2],
        [1, 1],
        [0, 1, 2, 1],
        [1, 1],
        false,
    );
    check_conv(
        [3, 64, 7, 6],
        32,
        [3, 2],
        [1, 1],
        [0, 1, 2, 0],
        [2, 1],
        true,
    );
    check_conv([3, 64, 5, 5], 40, [3, 3], [1, 1], [1; 4], [1, 1], false);
}

#[test]
fn conv_matches_burn_when_a_product_takes_several_images() {
    // Small output grids multiply several images' column matrices side by side: 41 images in
    // tasks of 6 (the last of 5), at 10×5 px five to a product (groups of 5 and 1, and 5), at
    // 4 px and at stride 2 a task's images all in one product.
    check_conv([41, 3, 10, 5], 5, [3, 3], [1, 1], [1; 4], [1, 1], false);
    check_conv([41, 3, 4, 4], 5, [3, 3], [1, 1], [1; 4], [1, 1], false);
    check_conv([41, 3, 9, 8], 4, [3, 3], [2, 2], [1; 4], [1, 1], true);
    check_conv([41, 3, 8, 8], 4, [1, 1], [2, 2], [0; 4], [1, 1], false);
    // More output channels than columns over the batch: the weight gradient in one product.
    check_conv([5, 3, 4, 4], 24, [3, 3], [1, 1], [1; 4], [1, 1], false);
    check_conv([5, 3, 8, 8], 24, [3, 3], [2, 2], [1; 4], [1, 1], false);
}

#[test]
fn conv_matches_burn_for_pointwise_patch_and_odd_geometries() {
    // 1×1 at stride 1 (the image is its own column matrix), a ViT patch embedding with bias,
    // asymmetric padding, dilation, dilation with stride 2 and asymmetric padding, a kernel
    // larger than the input, a 1×1 output.
    check_conv([3, 6, 5, 4], 7, [1, 1], [1, 1], [0; 4], [1, 1], false);
    check_conv([2, 3, 16, 16], 8, [4, 4], [4, 4], [0; 4], [1, 1], true);
    check_conv([2, 3, 7, 6], 4, [3, 2], [2, 1], [0, 1, 2, 0], [1, 1], true);
    check_conv([2, 3, 9, 9], 4, [3, 3], [1, 1], [2; 4], [2, 2], false);
    check_conv(
        [2, 3, 11, 10],
        4,
        [3, 3],
        [2, 2],
        [1, 3, 2, 0],
        [2, 2],
        false,
    );
    check_conv([2, 2, 3, 3], 3, [5, 5], [1, 1], [2; 4], [1, 1], false);
    // Stride 1 runs tap by tap on the padded image: asymmetric padding with kernels dilated
    // down and across, and a 1×1 kernel with padding.
    check_conv([2, 3, 7, 20], 4, [2, 3], [1, 1], [0, 1, 2, 0], [2, 1], true);
    check_conv(
        [2, 3, 5, 36],
        4,
        [1, 3],
        [1, 1],
        [1, 2, 0, 2],
        [1, 2],
        false,
    );
    check_conv([2, 3, 4, 9], 2, [1, 1], [1, 1], [1, 0, 0, 2], [1, 1], false);
    check_conv([2, 3, 7, 7], 3, [7, 7], [1, 1], [0; 4], [1, 1], true);
}

#[test]
fn conv_direct_matches_burn_for_narrow_layers() {
    // At stride 1 the forward pass sums its taps in registers up to 16 input channels, the
    // input gradient up to 8 output channels (the eighth-width ResNet-18's 8→8 and 16→16
    // layers; outputs in tiles of 4 and fewer, positions in tiles of 24 and fewer with the last
    // vector masked); 17 input or 16 output channels take the products. Small images: the
    // weight gradient's sums over many positions differ from burn's by more than the bound in
    // f32 rounding alone.
    check_conv([1, 8, 12, 24], 8, [3, 3], [1, 1], [1; 4], [1, 1], false);
    check_conv([2, 16, 8, 16], 16, [3, 3], [1, 1], [1; 4], [1, 1], false);
    check_conv([2, 5, 6, 17], 7, [3, 3], [1, 1], [1; 4], [1, 1], true);
    check_conv([2, 17, 6, 16], 4, [3, 3], [1, 1], [1; 4], [1, 1], false);
    // Narrow layers run tap by tap on grids up to 1/3 wider than their output: the 16→16 layer
    // at 12 px (direct forward), 32→32 at 6 px (products but the weight gradient); 33 channels
    // at 6 px take the columns.
    check_conv([2, 16, 5, 12], 16, [3, 3], [1, 1], [1; 4], [1, 1], false);
    check_conv([3, 32, 6, 6], 32, [3, 3], [1, 1], [1; 4], [1, 1], false);
    check_conv([3, 33, 6, 6], 8, [3, 3], [1, 1], [1; 4], [1, 1], false);
    // The weight gradient sums in registers on 17 to 32 output channels (in chunks of 32 or 16
    // with the last vector masked; terms in tiles where they come in runs of three, as a 3×3
    // kernel's rows, else one by one, as a kernel dilated along its rows); 33 take the products.
    check_conv([3, 3, 9, 14], 17, [3, 3], [1, 1], [1; 4], [1, 1], true);
    check_conv(
        [2, 3, 7, 20],
        20,
        [2, 3],
        [1, 1],
        [0, 2, 1, 2],
        [1, 2],
        false,
    );
    check_conv([2, 8, 6, 16], 33, [3, 3], [1, 1], [1; 4], [1, 1], false);
}

#[test]
fn conv_matches_burn_for_batches_of_any_size() {
    // One image, and batches that do not split evenly into the kernel's parallel tasks.
    for n in [1, 5, 13] {
        check_conv([n, 2, 6, 5], 3, [3, 3], [1, 1], [1; 4], [1, 1], false);
        check_conv([n, 2, 4, 16], 3, [3, 3], [1, 1], [1; 4], [1, 1], false);
    }
}

#[test]
fn conv_outside_training_matches_burn() {
    let device = Device::flex();
    let conv = convolution(
        [3, 5],
        [3, 3],
        [2, 2],
        PaddingConfig2d::Explicit(1, 1, 1, 1),
        [1, 1],
        true,
        &device,
    );
    let x = Tensor::<4>::from_data(random([2, 3, 8, 8], 3, 1.0, 0.0), &device);
    assert_close(
        "eval output",
        kernels::conv2d(&conv, x.clone()),
        conv.forward(x),
    );
}

#[test]
fn gelu_matches_burn() {
    let device = Device::flex().autodiff();
    // Values over the whole useful range, tails included, in more than one parallel chunk.
    let x = Tensor::<2>::from_data(random([300, 97], 1, 6.0, 0.0), &device).require_grad();
    let weights = Tensor::<2>::from_data(random([300, 97], 2, 1.0, 0.0), &device);
    let run = |fused: bool| {
        let y = match fused {
            true => kernels::gelu(x.clone()),
            false => burn::tensor::activation::gelu(x.clone()),
        };
        let grads = (y.clone() * weights.clone()).sum().backward();
        (y, x.grad(&grads).unwrap())
    };
    let (fused, reference) = (run(true), run(false));
    assert_close("gelu", fused.0, reference.0);
    assert_close("gelu grad", fused.1, reference.1);
}

#[test]
fn log_softmax_matches_burn() {
    let device = Device::flex().autodiff();
    // MoCo's logits: 1 + 4,096 columns over τ (rows in many parallel chunks), one entry masked
    // to −1e9 as NT-Xent masks a view against itself; and short rows of large values.
    for (shape, scale) in [([37, 4097], 10.0), ([300, 7], 60.0)] {
        let mut data = random(shape, 6, scale, 1.0);
        data.as_mut_slice::<f32>().unwrap()[5] = -1e9;
        let x = Tensor::<2>::from_data(data, &device).require_grad();
        let weights = Tensor::<2>::from_data(random(shape, 7, 1.0, 0.0), &device);
        let run = |fused: bool| {
            let y = match fused {
                true => kernels::log_softmax(x.clone()),
                false => burn::tensor::activation::log_softmax(x.clone(), 1),
            };
            let grads = (y.clone() * weights.clone()).sum().backward();
            (y, x.grad(&grads).unwrap())
        };
        let (fused, reference) = (run(true), run(false));
        assert_close("log_softmax", fused.0, reference.0);
        assert_close("log_softmax grad", fused.1, reference.1);
    }
}

#[test]
fn relu_and_add_relu_are_burns_bit_for_bit() {
    let device = Device::flex().autodiff();
    // Two parallel chunks; exact zeros, -0 and NaN among the values (burn's ReLU keeps NaN and
    // passes its gradient, masks 0 and -0).
    let mut data = random([2, 8, 33, 33], 3, 2.0, 0.0);
    let values = data.as_mut_slice::<f32>().unwrap();
    for (i, v) in [
        (0, 0.0),
        (1, -0.0),
        (5, f32::NAN),
        (17_000, f32::NAN),
        (17_001, 0.0),
    ] {
        values[i] = v;
    }
    let x = Tensor::<4>::from_data(data, &device).require_grad();
    let y = Tensor::<4>::from_data(random([2, 8, 33, 33], 4, 2.0, 0.0), &device).require_grad();
    let weights = Tensor::<4>::from_data(random([2, 8, 33, 33], 5, 1.0, 0.0), &device);
    let bits = |t: Tensor<4>| -> Vec<u32> {
        let values = t.into_data().try_to_vec::<f32>().unwrap();
        values.iter().map(|v| v.to_bits()).collect()
    };
    let run = |fused: bool| {
        // x reaches the sum twice (through y·x too), as a ResNet block's input does.
        let b = y.clone() * x.clone();
        let (a, out) = match fused {
            true => (kernels::relu(x.clone()), kernels::add_relu(x.clone(), b)),
            false => (relu(x.clone()), relu(x.clone() + b)),
        };
        let grads = ((a.clone() + out.clone()) * weights.clone())
            .sum()
            .backward();
        let grad = |t: &Tensor<4>| bits(t.grad(&grads).unwrap());
        [bits(a), bits(out), grad(&x), grad(&y)]
    };
    let names = ["relu", "add_relu", "x grad", "y grad"];
    for ((name, fused), reference) in names.iter().zip(run(true)).zip(run(false)) {
        assert!(
            fused == reference,
            "{name}: differs from burn's in its bits"
        );
    }
    // A parent without a gradient (a constant) gets none; the other its masked gradient.
    let constant = Tensor::<4>::from_data(random([2, 8, 33, 33], 4, 2.0, 0.0), &device);
    let x_grad = |out: Tensor<4>| {
        let grads = (out * weights.clone()).sum().backward();
        assert!(constant.grad(&grads).is_none(), "a constant got a gradient");
        bits(x.grad(&grads).unwrap())
    };
    assert!(
        x_grad(kernels::add_relu(x.clone(), constant.clone()))
            == x_grad(relu(x.clone() + constant.clone())),
        "x grad beside a constant: differs from burn's in its bits"
    );
}

/// A layer norm over `d` with non-trivial γ and β on `device`.
fn layer_norm_module(d: usize, device: &Device) -> LayerNorm {
    let mut ln = LayerNormConfig::new(d).with_epsilon(1e-6).init(device);
    ln.gamma = Param::from_tensor(Tensor::from_data(random([d], 7, 0.5, 1.0), device));
    ln.beta = Some(Param::from_tensor(Tensor::from_data(
        random([d], 8, 0.5, 0.0),
        device,
    )));
    ln
}

#[test]
fn layer_norm_matches_burn() {
    // ViT tokens [n, t, d], rows spanning several parallel tasks, an offset mean; an odd d too.
    for d in [192, 37] {
        check_layer_norm([5, 41, d]);
    }
}

/// The fused layer norm against burn's: values and the x, γ and β gradients.
fn check_layer_norm(shape: [usize; 3]) {
    let device = Device::flex().autodiff();
    let x = Tensor::<3>::from_data(random(shape, 1, 2.0, 1.5), &device).require_grad();
    let weights = Tensor::<3>::from_data(random(shape, 2, 1.0, 0.0), &device);
    let run = |fused: bool| {
        let ln = layer_norm_module(shape[2], &device);
        let y = match fused {
            true => kernels::layer_norm(&ln, x.clone(), 1e-6),
            false => ln.forward(x.clone()),
        };
        let grads = (y.clone() * weights.clone()).sum().backward();
        let beta = ln.beta.as_ref().unwrap().val();
        (
            y,
            x.grad(&grads).unwrap(),
            ln.gamma.val().grad(&grads).unwrap(),
            beta.grad(&grads).unwrap(),
        )
    };
    let (fused, reference) = (run(true), run(false));
    assert_close("layer norm", fused.0, reference.0);
    assert_close("x grad", fused.1, reference.1);
    assert_close("gamma grad", fused.2, reference.2);
    assert_close("beta grad", fused.3, reference.3);
}

#[test]
fn layer_norm_of_half_precision_is_burns() {
    // The kernels take f32; other dtypes go to burn's op.
    let device = Device::flex();
    let ln = layer_norm_module(16, &device);
    let x = Tensor::<2>::from_data(random([7, 16], 3, 1.0, 0.0), &device)
        .cast(burn::tensor::DType::F16);
    let got = kernels::layer_norm(&ln, x.clone(), 1e-6).cast(burn::tensor::DType::F32);
    assert_close(
        "f16 layer norm",
        got,
        ln.forward(x).cast(burn::tensor::DType::F32),
    );
}

#[test]
fn layer_norm_outside_training_matches_burn() {
    let device = Device::flex();
    let ln = layer_norm_module(16, &device);
    let x = Tensor::<2>::from_data(random([7, 16], 3, 1.0, 0.0), &device);
    assert_close(
        "eval layer norm",
        kernels::layer_norm(&ln, x.clone(), 1e-6),
        ln.forward(x),
    );
}

#[test]
fn gradients_are_the_same_bits_on_every_run() {
    // Parallel reductions (batch norm's statistics, the weight, γ and linear gradients) add their
    // partial sums in a fixed order: a resumed run must repeat the uninterrupted one exactly.
    let device = Device::flex().autodiff();
    let conv = resnet_conv([3, 8], &device);
    let bn = layer(8, &device);
    let ln = layer_norm_module(8, &device);
    // The convolution runs tap by tap (18 px wide); 9,216 rows of 8 into 128: over gemm's
    // threading threshold both ways.
    let fc = Tensor::<2>::from_data(random([8, 128], 2, 1.0, 0.0), &device).require_grad();
    let x = Tensor::<4>::from_data(random([64, 3, 8, 18], 1, 1.0, 0.5), &device);
    let grads = || {
        let y = kernels::batch_norm(&bn, kernels::conv2d(&conv, x.clone()));
        let z = kernels::layer_norm(&ln, kernels::gelu(y.swap_dims(1, 3)), 1e-6);
        let z = kernels::linear(z, fc.clone(), None);
        let grads = z.powi_scalar(2).sum().backward();
        let bits = |t: Tensor<1>| {
            t.into_data()
                .try_to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        [
            bits(conv.weight.val().grad(&grads).unwrap().flatten(0, 3)),
            bits(bn.gamma.val().grad(&grads).unwrap()),
            bits(ln.gamma.val().grad(&grads).unwrap()),
            bits(fc.grad(&grads).unwrap().flatten(0, 1)),
        ]
    };
    let first = grads();
    for _ in 0..2 {
        assert_eq!(grads(), first);
    }
    // The same bits on a machine with another number of cores.
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        assert_eq!(pool.install(grads), first, "{threads} threads");
    }
}

/// burn's composition of multi-head attention from a qkv projection, as timm writes it.
fn attention_composed(qkv: Tensor<3>, heads: usize) -> (Tensor<3>, Tensor<4>) {
    let [n, t, d3] = qkv.dims();
    let dh = d3 / 3 / heads;
    let qkv = qkv.reshape([n, t, 3, heads, dh]).permute([2, 0, 3, 1, 4]);
    let part = |i| qkv.clone().narrow(0, i, 1).reshape([n, heads, t, dh]);
    let scores = part(0).matmul(part(1).swap_dims(2, 3)) / (dh as f32).sqrt();
    let weights = burn::tensor::activation::softmax(scores, 3);
    let out = weights.clone().matmul(part(2)).swap_dims(1, 2);
    (out.reshape([n, t, d3 / 3]), weights)
}

#[test]
fn attention_matches_burn() {
    let device = Device::flex().autodiff();
    // ViT-Tiny's heads (3 of 64) over 65 tokens, MAE's 17 visible tokens at 8 heads, and a
    // strided input (the qkv projection transposed back), in more than one parallel task.
    for (shape, heads, strided) in [
        ([3, 65, 576], 3, false),
        ([9, 17, 768], 8, false),
        ([4, 10, 36], 2, true),
    ] {
        let qkv = match strided {
            false => Tensor::<3>::from_data(random(shape, 1, 3.0, 0.0), &device),
            true => {
                let [n, t, d3] = shape;
                Tensor::<3>::from_data(random([t, n, d3], 1, 3.0, 0.0), &device).swap_dims(0, 1)
            }
        }
        .require_grad();
        let [n, t, d3] = qkv.dims();
        let weights = Tensor::<3>::from_data(random([n, t, d3 / 3], 2, 1.0, 0.0), &device);
        let run = |fused: bool| {
            let (y, attn) = match fused {
                true => kernels::attention(qkv.clone(), heads),
                false => attention_composed(qkv.clone(), heads),
            };
            let grads = (y.clone() * weights.clone()).sum().backward();
            (y, attn, qkv.grad(&grads).unwrap())
        };
        let (fused, reference) = (run(true), run(false));
        assert_close("attention", fused.0, reference.0);
        assert_close("attention weights", fused.1, reference.1);
        assert_close("qkv grad", fused.2, reference.2);
    }
    // Outside autodiff (attention maps, features): the same kernel, forward only.
    let device = Device::flex();
    let qkv = Tensor::<3>::from_data(random([2, 7, 24], 3, 1.0, 0.0), &device);
    let (fused, reference) = (
        kernels::attention(qkv.clone(), 2),
        attention_composed(qkv, 2),
    );
    assert_close("eval attention", fused.0, reference.0);
    assert_close("eval attention weights", fused.1, reference.1);
}

#[test]
fn linear_matches_burn() {
    let device = Device::flex().autodiff();
    // MAE's qkv projection over a batch of visible tokens (large enough for gemm's threads), a
    // small 2-D one, one without a bias, and a strided input (a transposed copy's view).
    for (shape, n, bias, strided) in [
        ([64, 17, 192], 576, true, false),
        ([1, 5, 7], 3, true, false),
        ([2, 9, 16], 40, false, false),
        ([3, 4, 10], 6, true, true),
    ] {
        let x = match strided {
            false => Tensor::<3>::from_data(random(shape, 1, 2.0, 0.0), &device),
            true => {
                let [a, b, k] = shape;
                Tensor::<3>::from_data(random([b, a, k], 1, 2.0, 0.0), &device).swap_dims(0, 1)
            }
        }
        .require_grad();
        let k = shape[2];
        let weight = Tensor::<2>::from_data(random([k, n], 2, 0.5, 0.0), &device).require_grad();
        let b =
            bias.then(|| Tensor::<1>::from_data(random([n], 3, 1.0, 0.0), &device).require_grad());
        let upstream =
            Tensor::<3>::from_data(random([shape[0], shape[1], n], 4, 1.0, 0.0), &device);
        let run = |fused: bool| {
            let y = match fused {
                true => kernels::linear(x.clone(), weight.clone(), b.clone()),
                false => burn::tensor::module::linear(x.clone(), weight.clone(), b.clone()),
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let bias_grad = b.as_ref().map(|b| b.grad(&grads).unwrap());
            (
                y,
                x.grad(&grads).unwrap(),
                weight.grad(&grads).unwrap(),
                bias_grad,
            )
        };
        let (fused, reference) = (run(true), run(false));
        assert_close("linear", fused.0, reference.0);
        assert_close("linear x grad", fused.1, reference.1);
        assert_close("linear weight grad", fused.2, reference.2);
        // The bias gradient is the upstream gradient's column sums, here in f64 (burn's f32 sum
        // over 1,088 rows is itself 1e-5 off).
        if let Some(got) = fused.3 {
            let up = upstream.clone().into_data().try_to_vec::<f32>().unwrap();
            let want: Vec<f32> = (0..n)
                .map(|j| up.iter().skip(j).step_by(n).map(|&v| v as f64).sum::<f64>() as f32)
                .collect();
            assert_close(
                "linear bias grad",
                got,
                Tensor::from_data(TensorData::new(want, [n]), &device),
            );
            assert!(reference.3.is_some());
        }
    }
    // Outside autodiff (features, the teacher): the same kernel, forward only.
    let device = Device::flex();
    // No inputs at all: the output is the bias in every row.
    let bias = Tensor::<1>::from_data(random([3], 7, 1.0, 0.0), &device);
    let empty = kernels::linear(
        Tensor::<2>::zeros([4, 0], &device),
        Tensor::<2>::zeros([0, 3], &device),
        Some(bias.clone()),
    );
    assert_close(
        "linear of nothing",
        empty,
        bias.unsqueeze::<2>().repeat_dim(0, 4),
    );
    let x = Tensor::<2>::from_data(random([6, 8], 5, 1.0, 0.0), &device);
    let weight = Tensor::<2>::from_data(random([8, 3], 6, 1.0, 0.0), &device);
    let bias = Tensor::<1>::from_data(random([3], 7, 1.0, 0.0), &device);
    assert_close(
        "eval linear",
        kernels::linear(x.clone(), weight.clone(), Some(bias.clone())),
        burn::tensor::module::linear(x, weight, Some(bias)),
    );
}

#[test]
fn ema_is_burns_blend_bit_for_bit() {
    let device = Device::flex();
    let bits = |t: Tensor<2>| {
        let v = t.into_data().try_to_vec::<f32>().unwrap();
        v.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    // Several parallel chunks, a small tensor, and a strided (transposed) teacher.
    for (shape, strided) in [([300, 200], false), ([3, 5], false), ([40, 30], true)] {
        let teacher = match strided {
            false => Tensor::<2>::from_data(random(shape, 1, 1.0, 0.0), &device),
            true => Tensor::<2>::from_data(random([shape[1], shape[0]], 1, 1.0, 0.0), &device)
                .swap_dims(0, 1),
        };
        let student = Tensor::<2>::from_data(random(shape, 2, 1.0, 0.0), &device);
        for m in [0.996, 0.0] {
            let want = teacher.clone().mul_scalar(m) + student.clone().mul_scalar(1.0 - m);
            let got = kernels::ema(teacher.clone(), student.clone(), m);
            assert_eq!(bits(got), bits(want), "{shape:?}, m = {m}");
        }
    }
}

#[test]
fn exp_is_within_one_ulp_of_f64() {
    // Every 997th f32 from e^-87.3 to e^88.3 (the range it computes), and the ends themselves.
    let (lo, hi) = ((-87.3f32).to_bits(), 88.3f32.to_bits());
    let range = (0x8000_0000..=lo).step_by(997).chain((0..=hi).step_by(997));
    for x in range.map(f32::from_bits).chain([-87.3, 88.3]) {
        let want = (x as f64).exp();
        let ulp = (want as f32).next_up() as f64 - want as f32 as f64;
        let err = (kernels::exp(x) as f64 - want).abs() / ulp;
        // NaN fails too.
        assert!(err <= 1.0, "exp({x}) is {err} ulp off");
    }
    assert_eq!(kernels::exp(0.0), 1.0);
    assert!(kernels::exp(f32::NAN).is_nan());
    // Outside: flushed to 0 below (where e^x would be subnormal), +inf above.
    for x in [-87.4, -100.0, -1e4, f32::NEG_INFINITY] {
        assert_eq!(kernels::exp(x), 0.0, "exp({x})");
    }
    for x in [88.4, 89.0, 1e4, f32::INFINITY] {
        assert_eq!(kernels::exp(x), f32::INFINITY, "exp({x})");
    }
}

#[test]
fn every_vector_width_gives_the_same_bits() {
    // GELU, layer norm, the attention's softmax, log softmax, batch norm (its f64 sums and
    // affine maps; alone and with its fused ReLU) and a narrow convolution (the direct correlation of its forward pass and
    // input gradient, and a wider one's weight gradient summed in registers),
    // forward and backward, compiled for AVX-512, AVX2 and the x86-64 baseline (as far as this
    // CPU has them): a run resumed on another CPU repeats the uninterrupted one. Odd sizes, so
    // the loops' remainders run too.
    let device = Device::flex().autodiff();
    let ln = layer_norm_module(37, &device);
    let bn = layer(5, &device);
    let (conv, wider) = (resnet_conv([6, 7], &device), resnet_conv([6, 17], &device));
    let x = Tensor::<3>::from_data(random([3, 17, 37], 1, 4.0, 0.5), &device).require_grad();
    let qkv = Tensor::<3>::from_data(random([3, 17, 3 * 24], 2, 2.0, 0.0), &device).require_grad();
    let image = Tensor::<4>::from_data(random([3, 5, 7, 9], 3, 2.0, 3.0), &device).require_grad();
    // 15 × 19 output positions on a 21-wide padded grid: 315, six whole tiles of 48 and 27.
    let planes =
        Tensor::<4>::from_data(random([2, 6, 15, 19], 4, 1.0, 0.0), &device).require_grad();
    let run = || {
        let y = kernels::layer_norm(&ln, kernels::gelu(x.clone()), 1e-6);
        let (attended, _) = kernels::attention(qkv.clone(), 3);
        let normed = kernels::batch_norm(&bn, image.clone());
        let rectified = kernels::batch_norm_relu(&bn, image.clone());
        let convolved = kernels::conv2d(&conv, planes.clone());
        let widened = kernels::conv2d(&wider, planes.clone());
        let log_p = kernels::log_softmax(x.clone());
        let loss = y.clone().powi_scalar(2).sum()
            + attended.clone().powi_scalar(2).sum()
            + normed.clone().powi_scalar(3).sum()
            + (rectified.clone() * image.clone()).sum()
            + convolved.clone().powi_scalar(2).sum()
            + widened.powi_scalar(2).sum()
            + (log_p.clone() * x.clone()).sum();
        let grads = loss.backward();
        [
            bits(y),
            bits(attended),
            bits(normed),
            bits(rectified),
            bits(convolved),
            bits(log_p),
            bits(x.grad(&grads).unwrap()),
            bits(qkv.grad(&grads).unwrap()),
            bits(image.grad(&grads).unwrap()),
            bits(planes.grad(&grads).unwrap()),
            bits(wider.weight.val().grad(&grads).unwrap()),
        ]
    };
    let widest = run();
    for level in [1, 0] {
        kernels::limit_vector_width(level);
        let narrower = run();
        kernels::limit_vector_width(2);
        assert!(narrower == widest, "vector width {level} gives other bits");
    }
}

/// The bit patterns of a tensor's f32 values.
fn bits<const D: usize>(t: Tensor<D>) -> Vec<u32> {
    let values = t.into_data().try_to_vec::<f32>().unwrap();
    values.iter().map(|v| v.to_bits()).collect()
}

/// ‖got − want‖ / ‖want‖ over all values.
fn relative_error<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let values = |t: Tensor<D>| t.into_data().try_to_vec::<f32>().unwrap();
    let (got, want) = (values(got), values(want));
    let diff: f64 = got
        .iter()
        .zip(&want)
        .map(|(g, w)| ((g - w) as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

/// Asserts that each of `got` (under a bf16 autocast) is within bf16's rounding of `want` (f32):
/// a relative error under 1%, and above 1e-5 (bf16 products did run: f32's differ by ~1e-7).
fn assert_bf16<const D: usize>(what: &str, got: Tensor<D>, want: Tensor<D>) {
    let error = relative_error(got, want);
    assert!(
        (1e-5..1e-2).contains(&error),
        "{what}: relative error {error:e} from f32's (bf16 rounding gives ~3e-3)"
    );
}

/// On a CPU with a bf16 engine (AMX or AVX-512 BF16), a bf16 autocast runs the fused
/// convolutions, linears and attention with bf16 products, forward and backward: values and
/// gradients within bf16's rounding of the f32 kernels'.
#[test]
fn bf16_products_follow_f32_within_bf16_rounding() {
    use selfsup::precision::{autocast, Precision};
    if !selfsup::bf16::available() {
        eprintln!("no bf16 engine on this CPU: bf16 autocast takes burn's ops, not checked here");
        return;
    }
    let device = Device::flex().autodiff();
    let in_bf16 = |bf16: bool, f: &dyn Fn() -> Vec<Tensor<4>>| match bf16 {
        true => autocast(Precision::Bf16, f),
        false => f(),
    };
    // Convolutions: tap by tap (3×3, stride 1), by columns (stride 2), pointwise.
    for (input, co, kernel, stride, pad) in [
        ([4, 32, 16, 16], 32, 3, 1, 1),
        ([4, 32, 16, 16], 64, 3, 2, 1),
        ([4, 64, 8, 8], 64, 1, 1, 0),
    ] {
        let x = Tensor::<4>::from_data(random(input, 1, 1.0, 0.5), &device).require_grad();
        let conv = convolution(
            [input[1], co],
            [kernel; 2],
            [stride; 2],
            PaddingConfig2d::Explicit(pad, pad, pad, pad),
            [1, 1],
            false,
            &device,
        );
        let run = |bf16| {
            in_bf16(bf16, &|| {
                let y = kernels::conv2d(&conv, x.clone());
                let w = Tensor::<4>::from_data(random(y.dims(), 2, 1.0, 0.0), &device);
                let grads = (y.clone() * w).sum().backward();
                vec![
                    y,
                    x.grad(&grads).unwrap(),
                    conv.weight.val().grad(&grads).unwrap(),
                ]
            })
        };
        for (what, (low, full)) in ["conv", "conv x grad", "conv weight grad"]
            .iter()
            .zip(run(true).into_iter().zip(run(false)))
        {
            assert_bf16(
                &format!("{what} {input:?}→{co}, {kernel}×{kernel}/{stride}"),
                low,
                full,
            );
        }
    }
    // A linear of 96 → 128 over 64 rows, and ViT-Tiny's attention (3 heads of 64, 65 tokens).
    let x = Tensor::<2>::from_data(random([64, 96], 3, 1.0, 0.0), &device).require_grad();
    let weight = Tensor::<2>::from_data(random([96, 128], 4, 0.2, 0.0), &device).require_grad();
    let bias = Tensor::<1>::from_data(random([128], 5, 1.0, 0.0), &device).require_grad();
    let qkv = Tensor::<3>::from_data(random([2, 65, 576], 6, 2.0, 0.0), &device).require_grad();
    let run = |bf16| {
        in_bf16(bf16, &|| {
            let y = kernels::linear(x.clone(), weight.clone(), Some(bias.clone()));
            let (a, _) = kernels::attention(qkv.clone(), 3);
            let wy = Tensor::<2>::from_data(random([64, 128], 7, 1.0, 0.0), &device);
            let wa = Tensor::<3>::from_data(random(a.dims(), 8, 1.0, 0.0), &device);
            let grads = ((y.clone() * wy).sum() + (a.clone() * wa).sum()).backward();
            let as4 = |t: Tensor<2>| t.unsqueeze::<4>();
            vec![
                as4(y),
                as4(x.grad(&grads).unwrap()),
                as4(weight.grad(&grads).unwrap()),
                a.unsqueeze(),
                qkv.grad(&grads).unwrap().unsqueeze(),
            ]
        })
    };
    let names = [
        "linear",
        "linear x grad",
        "linear weight grad",
        "attention",
        "qkv grad",
    ];
    for (what, (low, full)) in names.iter().zip(run(true).into_iter().zip(run(false))) {
        assert_bf16(what, low, full);
    }
    // The bias gradient is a column sum, f32 in both: the same within f32 rounding.
}

#[test]
fn channels_last_weight_gradient_holds_at_a_training_batch() {
    // The weight gradient sums over every image and position (256 × 36 = 9,216 terms a value at
    // 6 px): against an f64 sum, the channels-last path's (on AVX-512; elsewhere the columns')
    // is within 1e-6 in relative L2 (measured: 1.8e-7; burn's own convolution 3.9e-7).
    let (n, c, co, hw) = (256, 48, 48, 6);
    let device = Device::flex().autodiff();
    let (xd, dyd) = (
        random([n, c, hw, hw], 1, 1.0, 0.5),
        random([n, co, hw, hw], 2, 1.0, 0.0),
    );
    let x = Tensor::<4>::from_data(xd.clone(), &device).require_grad();
    let conv = resnet_conv([c, co], &device);
    let output = kernels::conv2d(&conv, x);
    let grads = (output * Tensor::<4>::from_data(dyd.clone(), &device))
        .sum()
        .backward();
    let got = conv.weight.val().grad(&grads).unwrap().into_data();
    let (xs, dys) = (
        xd.try_to_vec::<f32>().unwrap(),
        dyd.try_to_vec::<f32>().unwrap(),
    );
    let at =
        |b: usize, (ch, of): (usize, usize), y: usize, x: usize| ((b * of + ch) * hw + y) * hw + x;
    let mut want = vec![0f64; co * c * 9];
    for (k, w) in want.iter_mut().enumerate() {
        let (o, ci, i, j) = (k / (c * 9), k / 9 % c, k / 3 % 3, k % 3);
        for b in 0..n {
            for (y, x) in (0..hw * hw).map(|p| (p / hw, p % hw)) {
                let (yy, xx) = ((y + i).wrapping_sub(1), (x + j).wrapping_sub(1));
                if yy < hw && xx < hw {
                    *w += dys[at(b, (o, co), y, x)] as f64 * xs[at(b, (ci, c), yy, xx)] as f64;
                }
            }
        }
    }
    let got = got.try_to_vec::<f32>().unwrap();
    let l2 = |v: &mut dyn Iterator<Item = f64>| v.map(|d| d * d).sum::<f64>().sqrt();
    let err = l2(&mut got.iter().zip(&want).map(|(g, w)| *g as f64 - w));
    let relative = err / l2(&mut want.iter().copied());
    assert!(
        relative < 1e-6,
        "weight gradient off an f64 sum by {relative:e}"
    );
}
