//! FASA kernels: every op has a CPU implementation (the reference and the fallback) in `cpu`,
//! and, with the `cuda` feature, a CUDA implementation in `gpu` checked against it.
pub mod cpu;
#[cfg(feature = "gpu")]
pub mod gpu;
