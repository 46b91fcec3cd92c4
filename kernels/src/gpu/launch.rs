//! Kernel launches of the decode chain (TIP → select → FAC → combine), optionally with Hopper's
//! programmatic dependent launch (PDL): a launch may start before the kernel before it in the
//! stream has completed (once that one's blocks have exited), so its launch overlaps that one's
//! tail. Every kernel launched here begins with `pdl_begin()` (common.cuh): `griddepcontrol.wait`
//! before it touches global memory, so it sees everything the kernel before it wrote, whatever
//! that kernel was.
//! cudarc's own builder has no launch attributes, hence this one; it takes the same `arg` calls.
//! It is a per-decoder switch (`FasaDecoder::pdl`, on by default since GPU run 18: faster at
//! batch 1 and 16 of Llama shapes in graphs); a decoder runs its launches inside [`pdl_scope`];
//! `FASA_GPU_PDL=0/1` or [`Gpu::set_pdl`] force it for every launch.
//! Launches outside a scope (single ops) go without it unless forced.
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::Ordering;

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DriverError, LaunchConfig};

use super::Gpu;

pub(crate) enum Arg {
    /// A device pointer, stored here (the kernel reads the parameter from this slot).
    Ptr(sys::CUdeviceptr),
    /// A value the caller owns for the builder's lifetime.
    Val(*const c_void),
}

/// Arguments of one launch, pushed with `arg` as on cudarc's `LaunchArgs`.
pub(crate) struct Launch<'a> {
    gpu: &'a Gpu,
    f: &'a CudaFunction,
    args: Vec<Arg>,
}

/// PDL forced for every launch on a GPU (`Gpu::pdl` holds one of these).
pub(crate) const PDL_AUTO: u8 = 0;
pub(crate) const PDL_OFF: u8 = 1;
pub(crate) const PDL_ON: u8 = 2;

thread_local! {
    /// The policy of the decode step being launched (or captured) on this thread.
    static STEP_PDL: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Launches made on this thread until the guard drops use PDL when `on` (unless forced).
pub(crate) fn pdl_scope(on: bool) -> PdlScope {
    PdlScope(STEP_PDL.with(|c| c.replace(Some(on))))
}

pub(crate) struct PdlScope(Option<bool>);

impl Drop for PdlScope {
    fn drop(&mut self) {
        STEP_PDL.with(|c| c.set(self.0));
    }
}

impl Gpu {
    /// A launch of `f` on this GPU's stream (PDL: see the module doc).
    pub(crate) fn launcher<'a>(&'a self, f: &'a CudaFunction) -> Launch<'a> {
        Launch { gpu: self, f, args: Vec::with_capacity(16) }
    }

    /// Forces programmatic dependent launch on or off for every decode launch made (or captured)
    /// after the call, over each decoder's own policy (as `FASA_GPU_PDL=1` / `0`). sm_90+ only
    /// (`griddepcontrol`); elsewhere it stays off.
    pub fn set_pdl(&self, on: bool) {
        self.pdl.store(if on && self.arch.0 >= 9 { PDL_ON } else { PDL_OFF }, Ordering::Relaxed);
    }

    /// Back to each decoder's own policy (the default without `FASA_GPU_PDL`).
    pub fn set_pdl_auto(&self) {
        self.pdl.store(PDL_AUTO, Ordering::Relaxed);
    }

    /// Whether PDL is forced on (`Some(true)`) or off, or left to the decoders (`None`).
    pub fn pdl_forced(&self) -> Option<bool> {
        match self.pdl.load(Ordering::Relaxed) {
            PDL_ON => Some(true),
            PDL_OFF => Some(false),
            _ => None,
        }
    }

    /// Whether a launch made now on this thread uses PDL.
    pub fn pdl(&self) -> bool {
        self.arch.0 >= 9 && self.pdl_forced().or_else(|| STEP_PDL.with(Cell::get)).unwrap_or(false)
    }
}

/// A kernel parameter: a value the caller keeps alive, or a device buffer (its pointer).
/// (Local, as cudarc's `PushKernelArg` blanket impl over `DeviceRepr` cannot be repeated here.)
pub(crate) trait Param<'b> {
    fn param(self, gpu: &Gpu) -> Arg;
}

macro_rules! value_params {
    ($($t:ty),*) => {$(
        impl<'b> Param<'b> for &'b $t {
            fn param(self, _: &Gpu) -> Arg {
                Arg::Val(self as *const $t as *const c_void)
            }
        }
    )*};
}
value_params!(i32, u32, u64, f32, super::Dims);

impl<'b, T> Param<'b> for &'b CudaSlice<T> {
    fn param(self, gpu: &Gpu) -> Arg {
        // The stream's event tracking is off (Gpu::new), so the guard records nothing.
        let (p, _guard) = self.device_ptr(&gpu.stream);
        Arg::Ptr(p)
    }
}

impl<'b, T> Param<'b> for &'b mut CudaSlice<T> {
    fn param(self, gpu: &Gpu) -> Arg {
        let (p, _guard) = self.device_ptr(&gpu.stream);
        Arg::Ptr(p)
    }
}

impl<'a> Launch<'a> {
    pub(crate) fn arg<'b: 'a, P: Param<'b>>(&mut self, p: P) -> &mut Self {
        let a = p.param(self.gpu);
        self.args.push(a);
        self
    }
}

impl Launch<'_> {
    /// # Safety
    /// As cudarc's `LaunchArgs::launch`: the arguments must match the kernel's parameters and
    /// the kernel must stay inside its buffers. The kernel must begin with `pdl_begin()`.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.gpu.ctx.bind_to_thread()?;
        let mut params: Vec<*mut c_void> = self
            .args
            .iter()
            .map(|a| match a {
                Arg::Ptr(p) => p as *const sys::CUdeviceptr as *mut c_void,
                Arg::Val(v) => *v as *mut c_void,
            })
            .collect();
        // SAFETY: a zeroed attribute is a valid "ignore" value; id and value set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let pdl = self.gpu.pdl();
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.gpu.stream.cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: pdl as u32,
        };
        // SAFETY: params point at this builder's slots or at values the caller keeps alive for
        // the builder's lifetime ('b: 'a); the caller vouches for their types.
        unsafe { sys::cuLaunchKernelEx(&config, self.f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }.result()
    }
}
