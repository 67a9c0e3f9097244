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
fn same_seed_same_weights() {
    let dev = Device::flex();
    let c = BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 0.125,
        init: None,
    });
    let x = input([1, 3, 32, 32], 2);
    let a = init_seeded(&dev, 5, || c.init(&dev))
        .forward(x.clone())
        .into_data();
    let b = init_seeded(&dev, 5, || c.init(&dev)).forward(x).into_data();
    assert_eq!(a, b);
}
