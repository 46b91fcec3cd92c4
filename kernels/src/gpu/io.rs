//! A decode step's inputs and output through page-locked host memory, so that the step (the
//! copies, the append and the decode launches) can be captured once as a CUDA graph and replayed
//! (the engine's `attention::gpu`).
//!
//! A step at batch 1 moves a few KiB each way: q `(n_q, d)`, the new token's K and V `(n_kv, d)`,
//! its position and the length up; the output `(n_q, d)` down. From pageable memory each copy is
//! staged by the driver, which returns only once it has taken the source, and a stream capture
//! refuses it. Here the inputs sit side by side in one page-locked buffer and one device
//! allocation, cut into the typed slices the launchers take, so one asynchronous copy brings them
//! all, and a graph records it.
use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaSlice, DevicePtr, ValidAsZeroBits};

use super::{Gpu, GpuError};

/// `len` values of `T` in page-locked host memory (zeroed at allocation: `T` is valid as zeros).
///
/// Not cudarc's `PinnedHostSlice`: that one waits on an event of its own at every host access,
/// recorded by cudarc's copies. A decode step writes its inputs and reads its output once around
/// one graph replay whose completion [`StepIo`]'s single event already tells, and the replay's
/// copies are graph nodes that never record that event: its waits would add driver calls to every
/// token and order nothing. (Its `alloc_pinned` is also write-combined, slow for the host to read
/// back the output from; this is cached.)
pub struct Pinned<T: Copy + ValidAsZeroBits> {
    ptr: *mut T,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain host memory owned by this value; the CUDA calls on it are made by its owner.
unsafe impl<T: Copy + ValidAsZeroBits + Send> Send for Pinned<T> {}
// SAFETY: as above; shared access only reads.
unsafe impl<T: Copy + ValidAsZeroBits + Sync> Sync for Pinned<T> {}

impl<T: Copy + ValidAsZeroBits> Pinned<T> {
    pub fn new(gpu: &Gpu, len: usize) -> Result<Self, GpuError> {
        gpu.ctx.bind_to_thread()?;
        let bytes = len.max(1) * std::mem::size_of::<T>();
        // SAFETY: flags 0 (cached, readable by the host at full speed: the output is read back).
        let ptr = unsafe { result::malloc_host(bytes, 0) }? as *mut T;
        // SAFETY: `bytes` were just allocated at ptr (page-aligned, so aligned for T).
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
        Ok(Self { ptr, len, ctx: Arc::clone(&gpu.ctx) })
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: len values, initialized (zeros, valid for T, then written as T).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above; &mut self is the only access from the host.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Copies `src` (as long as this) here, ordered on `gpu`'s stream (capturable). The caller
    /// reads the values only once that work has run (an event, or a sync).
    pub fn download(&mut self, gpu: &Gpu, src: &CudaSlice<T>) -> Result<(), GpuError> {
        if src.len() != self.len {
            return Err(GpuError::Shape(format!("download: {} values into {}", src.len(), self.len)));
        }
        gpu.ctx.bind_to_thread()?;
        let (p, _sync) = src.device_ptr(&gpu.stream);
        // SAFETY: same length (checked); page-locked destination owned by self.
        unsafe { result::memcpy_dtoh_async(self.as_mut_slice(), p, gpu.stream.cu_stream()) }?;
        Ok(())
    }
}

impl<T: Copy + ValidAsZeroBits> Drop for Pinned<T> {
    fn drop(&mut self) {
        // (the owner has waited for every copy from or to it: StepIo::drop)
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by malloc_host in new, freed once.
        let _ = unsafe { result::free_host(self.ptr as *mut c_void) };
    }
}

/// Word offsets of the inputs in [`StepIo`]'s buffers, each rounded up to 64 words (256 bytes:
/// the alignment of a device allocation, so vector loads in the kernels stay aligned).
#[derive(Clone, Copy)]
struct Layout {
    q: usize,
    k: usize,
    v: usize,
    pos: usize,
    lens: usize,
    words: usize,
}

impl Layout {
    fn new(n_q: usize, n_kv: usize, d: usize) -> Self {
        let up = |x: usize| x.div_ceil(64) * 64;
        let k = up(n_q * d);
        let v = k + up(n_kv * d);
        let pos = v + up(n_kv * d);
        let lens = pos + 64;
        Self { q: 0, k, v, pos, lens, words: lens + 64 }
    }
}

/// One sequence's decode-step inputs `q (n_q, d)`, `k_new`, `v_new (n_kv, d)` f32, `pos`, `lens`
/// `(1,)` i32 as device slices cut out of one allocation, with their page-locked twin; and the
/// output `(n_q, d)` f32 in page-locked memory.
pub struct StepIo {
    // Views into `dev` (never freed through these: `drop` leaks them before `dev` goes).
    pub q: ManuallyDrop<CudaSlice<f32>>,
    pub k_new: ManuallyDrop<CudaSlice<f32>>,
    pub v_new: ManuallyDrop<CudaSlice<f32>>,
    pub pos: ManuallyDrop<CudaSlice<i32>>,
    pub lens: ManuallyDrop<CudaSlice<i32>>,
    dev: CudaSlice<u32>,
    host: Pinned<u32>,
    out: Pinned<f32>,
    lay: Layout,
    /// Recorded after the last work that reads `host` or writes `out`.
    done: CudaEvent,
}

impl StepIo {
    pub fn new(gpu: &Gpu, n_q: usize, n_kv: usize, d: usize) -> Result<Self, GpuError> {
        let lay = Layout::new(n_q, n_kv, d);
        let dev = gpu.stream.alloc_zeros::<u32>(lay.words)?;
        let base = dev.device_ptr(&gpu.stream).0 as sys::CUdeviceptr;
        // SAFETY: each view lies inside `dev` (Layout), is 256-byte aligned, and is leaked, not
        // freed, in drop; `dev` outlives them (dropped after them there).
        let cut = |off: usize| base + (off * 4) as sys::CUdeviceptr;
        let (q, k_new, v_new, pos, lens) = unsafe {
            (
                gpu.stream.upgrade_device_ptr::<f32>(cut(lay.q), n_q * d),
                gpu.stream.upgrade_device_ptr::<f32>(cut(lay.k), n_kv * d),
                gpu.stream.upgrade_device_ptr::<f32>(cut(lay.v), n_kv * d),
                gpu.stream.upgrade_device_ptr::<i32>(cut(lay.pos), 1),
                gpu.stream.upgrade_device_ptr::<i32>(cut(lay.lens), 1),
            )
        };
        let done = gpu.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
        Ok(Self {
            q: ManuallyDrop::new(q),
            k_new: ManuallyDrop::new(k_new),
            v_new: ManuallyDrop::new(v_new),
            pos: ManuallyDrop::new(pos),
            lens: ManuallyDrop::new(lens),
            dev,
            host: Pinned::new(gpu, lay.words)?,
            out: Pinned::new(gpu, n_q * d)?,
            lay,
            done,
        })
    }

    /// Writes a step's inputs into the page-locked buffer, once the copies of the step before
    /// have taken it: `q (n_q, d)`, the new row `k`, `v (n_kv, d)` at `pos`, and `len`.
    /// `row`: the new token's `(k, v, pos)`, or None where no append runs (they stay as they were).
    pub fn stage(&mut self, q: &[f32], row: Option<(&[f32], &[f32], i32)>, len: i32) -> Result<(), GpuError> {
        let l = self.lay;
        let (nk, nq) = (self.k_new.len(), self.q.len());
        if q.len() != nq || row.is_some_and(|(k, v, _)| k.len() != nk || v.len() != nk) {
            return Err(GpuError::Shape(format!("step inputs: q of {} floats (want {nq}), the new K and V rows of {nk}", q.len())));
        }
        self.wait()?;
        let h = self.host.as_mut_slice();
        let put = |h: &mut [u32], at: usize, x: &[f32]| h[at..at + x.len()].iter_mut().zip(x).for_each(|(w, x)| *w = x.to_bits());
        put(h, l.q, q);
        if let Some((k, v, pos)) = row {
            put(h, l.k, k);
            put(h, l.v, v);
            h[l.pos] = pos as u32;
        }
        h[l.lens] = len as u32;
        Ok(())
    }

    /// Copies the staged inputs to the device, ordered on `gpu`'s stream (capturable).
    pub fn upload(&self, gpu: &Gpu) -> Result<(), GpuError> {
        gpu.ctx.bind_to_thread()?;
        let (p, _sync) = self.dev.device_ptr(&gpu.stream);
        // SAFETY: `host` and `dev` are both lay.words long; `host` is page-locked and not written
        // until `done` (recorded by `finish` after this copy) has completed (`stage`).
        unsafe { result::memcpy_htod_async(p, self.host.as_slice(), gpu.stream.cu_stream()) }?;
        Ok(())
    }

    /// Copies `src` (the step's `(n_q, d)` output) into the page-locked output, ordered on
    /// `gpu`'s stream (capturable); read it with [`StepIo::output`] after [`StepIo::finish`].
    pub fn download(&mut self, gpu: &Gpu, src: &CudaSlice<f32>) -> Result<(), GpuError> {
        self.out.download(gpu, src)
    }

    /// Marks the end of the work on `gpu`'s stream that uses the staging (after the step, or
    /// the graph replaying it, is launched).
    pub fn finish(&self, gpu: &Gpu) -> Result<(), GpuError> {
        self.done.record(&gpu.stream)?;
        Ok(())
    }

    /// Waits for the work before [`StepIo::finish`] (the step, and any copy queued with it).
    pub fn wait(&self) -> Result<(), GpuError> {
        self.done.synchronize()?;
        Ok(())
    }

    /// The output, once the work before [`StepIo::finish`] has run (waits for it).
    pub fn output(&self) -> Result<&[f32], GpuError> {
        self.wait()?;
        Ok(self.out.as_slice())
    }
}

/// Fills `x` with NaN (all bits set), ordered on `gpu`'s stream (capturable): tests poison
/// outputs so that an unwritten element shows.
pub fn poison(gpu: &Gpu, x: &mut CudaSlice<f32>) -> Result<(), GpuError> {
    gpu.ctx.bind_to_thread()?;
    let (p, _sync) = x.device_ptr(&gpu.stream);
    // SAFETY: x.len() floats of device memory at p.
    unsafe { result::memset_d8_async(p, 0xff, x.len() * 4, gpu.stream.cu_stream()) }?;
    Ok(())
}

impl Drop for StepIo {
    fn drop(&mut self) {
        // Copies may still read `host` or write `out`.
        let _ = self.done.synchronize();
        // SAFETY: each view is taken once, here, and leaked: `dev` owns the memory.
        unsafe {
            ManuallyDrop::take(&mut self.q).leak();
            ManuallyDrop::take(&mut self.k_new).leak();
            ManuallyDrop::take(&mut self.v_new).leak();
            ManuallyDrop::take(&mut self.pos).leak();
            ManuallyDrop::take(&mut self.lens).leak();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Layout;

    #[test]
    fn inputs_are_aligned_and_apart() {
        for (n_q, n_kv, d) in [(9, 3, 64), (32, 8, 128), (1, 1, 64), (14, 2, 64)] {
            let l = Layout::new(n_q, n_kv, d);
            let spans = [(l.q, n_q * d), (l.k, n_kv * d), (l.v, n_kv * d), (l.pos, 1), (l.lens, 1)];
            for (i, &(at, len)) in spans.iter().enumerate() {
                assert_eq!(at % 64, 0, "piece {i} of {n_q}/{n_kv}/{d} not 256-byte aligned");
                assert!(at + len <= l.words);
                if let Some(&(next, _)) = spans.get(i + 1) {
                    assert!(at + len <= next, "piece {i} of {n_q}/{n_kv}/{d} runs into the next");
                }
            }
        }
    }
}
