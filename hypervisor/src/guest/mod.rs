//! placeholder
pub mod loader;
