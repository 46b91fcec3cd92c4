//! FASA kernels: every op has a CPU implementation (the reference and the fallback) in `cpu`.
pub mod cpu;
