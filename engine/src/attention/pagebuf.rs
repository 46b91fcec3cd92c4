//! Buffers for the KV cache's pages, carved out of large anonymous maps advised for transparent
//! huge pages (`MADV_HUGEPAGE`).
//!
//! Why: stage 1 walks every page of a sequence and stage 2 gathers rows scattered over the whole
//! cache (1.4 GiB for SmolLM2 at 8k tokens): with 4 KiB pages nearly every page or row it touches
//! first needs a TLB walk. A random cache laid out as the engine's, 8k tokens × 90 (layer, KV
//! head)s, one thread: TIP 8972 → 5636 µs per step, top-C + re-rank 4533 → 2950, focused attention
//! 1565 → 948 with the maps advised (kernel THP mode `madvise`); whole process, `speed --depth
//! 8000`, against the allocator's heap: `fasa` decode 67–69 → 81 tok/s, dense 36 → 39. Where the
//! kernel has no THP the advice fails silently and the buffers work the same. `FASA_HUGE_PAGES=0`
//! leaves it out.
//!
//! Freed buffers go to a free list per size and are handed out again zeroed; the maps stay for
//! the life of the process, as an allocator's heap does.
use std::collections::{BTreeSet, HashMap};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{LazyLock, Mutex};

/// Address space per map (memory is committed page by page on first touch).
const CHUNK: usize = 64 << 20;
/// A huge page, the alignment of the first buffer of a map.
const HUGE: usize = 2 << 20;
/// Every buffer starts on a cache line.
const ALIGN: usize = 64;

#[derive(Default)]
struct Arena {
    maps: Vec<memmap2::MmapMut>,
    /// Next free byte in the last map and the map's end.
    next: usize,
    end: usize,
    /// Freed buffers by size in bytes, lowest address first: a sequence's pages, freed and taken
    /// again (slot copies, reuse), keep ascending addresses. Handed out last-freed-first they came
    /// back in reverse order, and dense decode at 8k tokens ran 36 → 24 tok/s.
    free: HashMap<usize, BTreeSet<usize>>,
}

static ARENA: LazyLock<Mutex<Arena>> = LazyLock::new(Default::default);

impl Arena {
    /// A zeroed buffer of `bytes` (a multiple of `ALIGN`), or None when no new map could be made.
    fn alloc(&mut self, bytes: usize) -> Option<usize> {
        if let Some(a) = self.free.get_mut(&bytes).and_then(BTreeSet::pop_first) {
            // SAFETY: `a..a + bytes` is a buffer of ours that nothing references (it was freed).
            unsafe { std::ptr::write_bytes(a as *mut u8, 0, bytes) };
            return Some(a);
        }
        if self.next + bytes > self.end {
            let len = CHUNK.max(bytes) + HUGE;
            let mut map = memmap2::MmapMut::map_anon(len).ok()?;
            if std::env::var("FASA_HUGE_PAGES").map_or(true, |v| v != "0") {
                let _ = map.advise(memmap2::Advice::HugePage);
            }
            let base = map.as_mut_ptr() as usize;
            (self.next, self.end) = (base.next_multiple_of(HUGE), base + len);
            self.maps.push(map);
        }
        let a = self.next;
        self.next += bytes;
        Some(a)
    }
}

/// Element types a zeroed buffer holds as zeros.
pub trait Elem: Copy + Send + Sync + 'static {}
impl Elem for f32 {}
impl Elem for i8 {}

/// An owned, zero-initialised `[T]` of fixed length from the arena (a `Box<[T]>` otherwise).
pub struct PageBuf<T: Elem> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: a PageBuf owns its buffer exclusively, as a Box<[T]> does.
unsafe impl<T: Elem> Send for PageBuf<T> {}
unsafe impl<T: Elem> Sync for PageBuf<T> {}

impl<T: Elem> PageBuf<T> {
    /// `len` zeros. Panics, as an allocation failure of `vec!` aborts, when no memory can be mapped.
    pub fn zeroed(len: usize) -> Self {
        let bytes = Self::bytes(len);
        let a = ARENA.lock().unwrap_or_else(|e| e.into_inner()).alloc(bytes).unwrap_or_else(|| panic!("KV cache: could not map {} MiB for cache pages", CHUNK >> 20));
        Self { ptr: NonNull::new(a as *mut T).expect("a mapped address"), len }
    }

    /// Bytes a buffer of `len` takes: whole cache lines.
    fn bytes(len: usize) -> usize {
        (len * std::mem::size_of::<T>()).next_multiple_of(ALIGN).max(ALIGN)
    }
}

impl<T: Elem> Drop for PageBuf<T> {
    fn drop(&mut self) {
        let mut a = ARENA.lock().unwrap_or_else(|e| e.into_inner());
        a.free.entry(Self::bytes(self.len)).or_default().insert(self.ptr.as_ptr() as usize);
    }
}

impl<T: Elem> Clone for PageBuf<T> {
    fn clone(&self) -> Self {
        let mut c = Self::zeroed(self.len);
        c.copy_from_slice(self);
        c
    }
}

impl<T: Elem> Deref for PageBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialised elements (zeroed, then written through &mut).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Elem> DerefMut for PageBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_distinct_and_reused() {
        let mut a = PageBuf::<f32>::zeroed(4096);
        let b = PageBuf::<i8>::zeroed(100);
        assert!(a.iter().all(|&x| x == 0.0) && b.iter().all(|&x| x == 0));
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        a.fill(7.0);
        let c = a.clone();
        assert_eq!(&c[..], &a[..]);
        assert_ne!(c.as_ptr(), a.as_ptr());
        drop(a);
        // A freed buffer comes back zeroed (the free list of its size; other tests may take it).
        let d = PageBuf::<f32>::zeroed(4096);
        assert!(d.iter().all(|&x| x == 0.0));
    }
}
