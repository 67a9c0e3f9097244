//! selfsup: self-supervised visual representation learning in one binary.
//!
//! Data flows one way: [`data`] decodes images into memory, [`augment`] draws the views each
//! method asks for, and [`viz`] turns what is worth looking at into PNG pictures.
//! [`config`] reads the TOML recipes that tie them together.

pub mod augment;
pub mod config;
pub mod data;
pub mod viz;
