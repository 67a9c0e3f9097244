//! Backbones: shapes, attention weights, and exported parameter names that PyTorch code expects.

use burn::tensor::{Device, Tensor};
use selfsup::models::{init_seeded, BackboneConfig, Pool, ResNetConfig, Stem, VitConfig};
use selfsup::weights::export as export_backbone;

/// Inputs from our own generator: burn's is global, and other tests seed it.
fn input(shape: [usize; 4], seed: u64) -> Tensor<4> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let data: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    Tensor::from_data(burn::tensor::TensorData::new(data, shape), &Device::flex())
}

fn exported(config: &BackboneConfig) -> safetensors::SafeTensors<'static> {
    let dev = Device::flex();
    let backbone = init_seeded(&dev, 0, || config.init(&dev));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.safetensors");
    export_backbone(&backbone, &path).unwrap();
    let bytes: &'static [u8] = Box::leak(std::fs::read(&path).unwrap().into_boxed_slice());
    safetensors::SafeTensors::deserialize(bytes).unwrap()
}

#[test]
fn resnets_have_torchvision_shapes_and_names() {
    let dev = Device::flex();
    for (depth, dim) in [(18, 512), (34, 512), (50, 2048)] {
        let c = ResNetConfig {
            depth,
            stem: Stem::Imagenet,
            width: 0.25,
            init: None,
            conv_init: Default::default(),
        };
        assert_eq!(c.feature_dim(), dim / 4);
        let m = init_seeded(&dev, 0, || c.init(&dev));
        let y = m.forward(input([2, 3, 64, 64], 0));
        assert_eq!(y.dims(), [2, dim / 4]);
    }
    let st = exported(&BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 1.0,
        init: None,
        conv_init: Default::default(),
    }));
    let shape = |name: &str| {
        st.tensor(name)
            .unwrap_or_else(|_| panic!("no {name} in {:?}", st.names()))
            .shape()
            .to_vec()
    };
    assert_eq!(shape("conv1.weight"), [64, 3, 3, 3]);
    assert_eq!(shape("bn1.weight"), [64]);
    assert_eq!(shape("bn1.running_var"), [64]);
    assert_eq!(shape("layer1.0.conv2.weight"), [64, 64, 3, 3]);
    assert_eq!(shape("layer2.0.downsample.0.weight"), [128, 64, 1, 1]);
    assert_eq!(shape("layer4.1.bn2.bias"), [512]);
    let st = exported(&BackboneConfig::Resnet(ResNetConfig {
        depth: 50,
        stem: Stem::Imagenet,
        width: 1.0,
        init: None,
        conv_init: Default::default(),
    }));
    assert_eq!(
        st.tensor("layer1.0.conv3.weight").unwrap().shape(),
        [256, 64, 1, 1]
    );
    assert_eq!(
        st.tensor("layer3.0.downsample.1.running_mean")
            .unwrap()
            .shape(),
        [1024]
    );
}

#[test]
fn vit_has_timm_names_and_exposes_attention() {
    let c = VitConfig {
        image_size: 32,
        patch_size: 4,
        dim: 48,
        depth: 2,
        heads: 3,
        mlp_ratio: 4.0,
        pool: Pool::Cls,
        registers: 0,
        layer_scale: None,
        no_embed_class: false,
        init: None,
    };
    let dev = Device::flex();
    let vit = init_seeded(&dev, 0, || c.init(&dev));
    let x = input([2, 3, 32, 32], 1);
    assert_eq!(vit.forward(x.clone()).dims(), [2, 48]);
    let attn = vit.last_attention(x);
    assert_eq!(attn.dims(), [2, 3, 65, 65]);
    let row_sums: Vec<f32> = attn.sum_dim(3).into_data().try_to_vec::<f32>().unwrap();
    assert!(
        row_sums.iter().all(|s| (s - 1.0).abs() < 1e-4),
        "attention rows are distributions"
    );
    let st = exported(&BackboneConfig::Vit(c));
    let shape = |name: &str| {
        st.tensor(name)
            .unwrap_or_else(|_| panic!("no {name} in {:?}", st.names()))
            .shape()
            .to_vec()
    };
    assert_eq!(shape("cls_token"), [1, 1, 48]);
    assert_eq!(shape("pos_embed"), [1, 65, 48]);
    assert_eq!(shape("patch_embed.proj.weight"), [48, 3, 4, 4]);
    assert_eq!(
        shape("blocks.1.attn.qkv.weight"),
        [144, 48],
        "PyTorch's [out, in] layout"
    );
    assert_eq!(shape("blocks.0.mlp.fc1.weight"), [192, 48]);
    assert_eq!(shape("blocks.0.norm1.weight"), [48]);
    assert_eq!(shape("norm.bias"), [48]);
}

#[test]
fn a_vit_with_registers_and_layer_scale_trains_them_and_leaves_the_registers_out() {
    let c = VitConfig {
        image_size: 32,
        patch_size: 8,
        dim: 48,
        depth: 2,
        heads: 3,
        mlp_ratio: 4.0,
        pool: Pool::Mean,
        registers: 2,
        layer_scale: Some(1e-5),
        no_embed_class: true,
        init: None,
    };
    let st = exported(&BackboneConfig::Vit(c.clone()));
    let shape = |name: &str| st.tensor(name).unwrap().shape().to_vec();
    assert_eq!(shape("reg_token"), [1, 2, 48]);
    assert_eq!(shape("pos_embed"), [1, 16, 48], "patches only");
    assert_eq!(shape("blocks.1.ls2.gamma"), [48]);
    let dev = Device::flex().autodiff();
    let vit = init_seeded(&dev, 0, || c.init(&dev));
    let x = input([2, 3, 32, 32], 1).to_device(&dev);
    assert_eq!(vit.prefix_tokens(), 3);
    // Class token, 2 registers, 16 patches; the feature map holds the patches alone.
    assert_eq!(vit.last_attention(x.clone()).dims(), [2, 3, 19, 19]);
    assert_eq!(vit.feature_map(x.clone()).dims(), [2, 48, 4, 4]);
    let grads = vit.forward(x).sum().backward();
    struct Count<'a>(&'a burn::tensor::Gradients, usize);
    impl burn::module::ModuleVisitor for Count<'_> {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
            self.1 += usize::from(p.val().grad(self.0).is_some());
        }
    }
    let mut learned = Count(&grads, 0);
    burn::module::Module::visit(&vit, &mut learned);
    // Every parameter learns: the registers and both γ of each block among them (patch
    // projection 2, class token, registers, positions, 2 × (2 norms × 2, qkv 2, proj 2, fc 2 × 2,
    // γ 2), final norm 2).
    assert_eq!(learned.1, 2 + 1 + 1 + 1 + 2 * (4 + 2 + 2 + 4 + 2) + 2);
}

#[test]
fn same_seed_same_weights() {
    let dev = Device::flex();
    let c = BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 0.125,
        init: None,
        conv_init: Default::default(),
    });
    let x = input([1, 3, 32, 32], 2);
    let a = init_seeded(&dev, 5, || c.init(&dev))
        .forward(x.clone())
        .into_data();
    let b = init_seeded(&dev, 5, || c.init(&dev)).forward(x).into_data();
    assert_eq!(a, b);
}

/// pos[a, b, c] = sin(0.3c + 0.7a + 1.3b) on a 4 × 4 grid of 2-d embeddings, `[16, 2]`.
fn sine_positions(device: &Device) -> Tensor<2> {
    let values: Vec<f32> = (0..4)
        .flat_map(|a| (0..4).flat_map(move |b| (0..2).map(move |c| (a, b, c))))
        .map(|(a, b, c)| (0.3 * c as f64 + 0.7 * a as f64 + 1.3 * b as f64).sin() as f32)
        .collect();
    Tensor::from_data(burn::tensor::TensorData::new(values, [16, 2]), device)
}

#[test]
fn position_embeddings_resize_bicubically_as_pytorch() {
    // F.interpolate(pos.permute(2, 0, 1)[None], size=(2, 3), mode="bicubic",
    // align_corners=False), PyTorch 2.15, back in [gh·gw, d] order.
    let torch = [
        0.402321, 0.625348, 0.775423, 0.55582, -0.712258, -0.84751, 0.841849, 0.702653, -0.569648,
        -0.785837, -0.61416, -0.388553,
    ];
    let dev = Device::flex();
    let out = selfsup::models::resize_positions(sine_positions(&dev), 4, [2, 3]);
    assert_eq!(out.dims(), [6, 2]);
    let out = out.into_data().try_to_vec::<f32>().unwrap();
    for (a, b) in out.iter().zip(torch) {
        assert!((a - b).abs() < 1e-5, "{out:?}");
    }
    // Values and gradients against burn's own bicubic interpolate, shrinking and growing.
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    let ad = dev.autodiff();
    for size in [[2, 3], [6, 5], [1, 1], [3, 3], [8, 8]] {
        let n = size[0] * size[1];
        let weights = Tensor::<2>::random([n, 2], burn::tensor::Distribution::Default, &ad);
        let ours = sine_positions(&ad).require_grad();
        let theirs = sine_positions(&ad).require_grad();
        let a = selfsup::models::resize_positions(ours.clone(), 4, size);
        let options = InterpolateOptions::new(InterpolateMode::Bicubic)
            .with_align_corners(false)
            .with_output_size(size);
        let b = interpolate(
            theirs.clone().reshape([1, 4, 4, 2]).permute([0, 3, 1, 2]),
            options,
        )
        .permute([0, 2, 3, 1])
        .reshape([n, 2]);
        let close = |x: Tensor<2>, y: Tensor<2>| {
            let diff: f32 = (x - y).abs().max().into_scalar();
            assert!(diff < 1e-5, "size {size:?}: {diff}");
        };
        close(a.clone().detach(), b.clone().detach());
        let ga = (a * weights.clone()).sum().backward();
        let gb = (b * weights).sum().backward();
        close(ours.grad(&ga).unwrap(), theirs.grad(&gb).unwrap());
    }
}
