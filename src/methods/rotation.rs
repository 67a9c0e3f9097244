//! RotNet (Gidaris et al. 2018): every image appears in the batch rotated by 0°, 90°, 180° and
//! 270°, and the encoder with a linear head classifies the rotation,
//!
//!   L = −(1/4N) Σ_i Σ_r log softmax(W f(rot_r(x_i)))_r.
//!
//! Recognising which way is up needs the objects' shapes and typical poses.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::augment::pretext::Rotations;
use crate::augment::{Augment, Pipeline};
use crate::losses::{accuracy, cross_entropy};
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::{Backbone, BackboneConfig, ProjectionHead, ProjectionHeadConfig};
use crate::train::{Method, Progress, StepOutput};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {}

impl RotationConfig {
    pub fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        feed.views("rotation", 1, "it turns one view of each image four ways")
    }

    pub fn augment(&self, base: Pipeline) -> Arc<dyn Augment> {
        Arc::new(Rotations(Arc::new(base)))
    }

    pub fn init(&self, model: &BackboneConfig, device: &Device) -> Rotation {
        Rotation {
            backbone: model.init(device),
            head: ProjectionHeadConfig::linear(model.feature_dim(), 4).init(device),
        }
    }
}

impl MethodSpec for RotationConfig {
    type Method = Rotation;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("rotation_cifar10");

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        RotationConfig::check(self, feed)
    }

    fn augment(&self, base: Pipeline) -> Arc<dyn Augment> {
        RotationConfig::augment(self, base)
    }

    fn init(&self, ctx: &InitContext) -> Rotation {
        RotationConfig::init(self, ctx.model, ctx.device)
    }
}

#[derive(Module, Debug)]
pub struct Rotation {
    backbone: Backbone,
    head: ProjectionHead,
}

impl Rotation {
    /// Rotation logits `[n, 4]`.
    pub fn logits(&self, x: Tensor<4>) -> Tensor<2> {
        self.head.forward(self.backbone.forward(x))
    }
}

impl Method for Rotation {
    /// `views[r]` is every image turned r quarter turns.
    fn loss(&self, views: &[Tensor<4>], _progress: &Progress) -> StepOutput {
        let [n, _, _, _] = views[0].dims();
        let logits = self.logits(Tensor::cat(views.to_vec(), 0));
        let labels: Vec<usize> = (0..4).flat_map(|r| std::iter::repeat_n(r, n)).collect();
        let acc = accuracy(logits.clone(), &labels);
        StepOutput::new(cross_entropy(logits, &labels), vec![("pretext_acc", acc)])
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn start_from(self, weights: Backbone) -> Self {
        Rotation {
            backbone: weights,
            ..self
        }
    }
}
