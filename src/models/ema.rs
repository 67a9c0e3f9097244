//! Momentum (EMA) copies of a module: MoCo's key encoder and DINO's teacher,
//!
//!   θt ← m·θt + (1−m)·θs   after every optimiser step, with no gradient into θt.
//!
//! Parameters are matched by their order in the module tree (teacher and student share one
//! architecture). Batch-norm running statistics are buffers, not parameters: the teacher keeps
//! its own, from its own forward passes, as in the official MoCo and DINO code.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// `blank` (a freshly initialised module of the student's architecture) made equal to
/// `student`, buffers included, with gradients off: the initial teacher, θt = θs.
/// It must be a fresh module, not `student.clone()`: burn's clone shares batch-norm running
/// statistics between the two.
pub fn momentum_copy<M: Module>(blank: M, student: &M) -> M {
    blend(blank, student, 0.0, true).no_grad()
}

/// θt ← m·θt + (1−m)·θs for every parameter.
pub fn ema_update<M: Module>(teacher: M, student: &M, m: f64) -> M {
    blend(teacher, student, m, false)
}

/// Module paths end in the field name; batch norm's buffers are `running_mean`, `running_var`.
fn is_buffer(path: &[String]) -> bool {
    path.last().is_some_and(|p| p.starts_with("running_"))
}

fn blend<M: Module>(teacher: M, student: &M, m: f64, buffers: bool) -> M {
    struct Collect {
        path: Vec<String>,
        values: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.values.push(param.val().detach().reshape([-1]));
        }
    }
    struct Blend {
        path: Vec<String>,
        student: std::vec::IntoIter<Tensor<1>>,
        m: f64,
        buffers: bool,
    }
    impl ModuleMapper for Blend {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let s = self
                .student
                .next()
                .expect("teacher and student differ in architecture");
            if is_buffer(&self.path) && !self.buffers {
                return param;
            }
            let m = self.m;
            param.map(|t| {
                let s = s.reshape(t.shape());
                crate::kernels::ema(t, s, m).set_require_grad(false)
            })
        }
    }
    let mut collect = Collect {
        path: vec![],
        values: vec![],
    };
    student.visit(&mut collect);
    teacher.map(&mut Blend {
        path: vec![],
        student: collect.values.into_iter(),
        m,
        buffers,
    })
}
