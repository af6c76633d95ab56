//! Request buffers that are in memory before the kernel copies into them.
//!
//! The kernel hands a FUSE request to the server by copying it into the
//! buffer of the server's `read(2)` on `/dev/fuse`; it pins that buffer's pages
//! first. A page not yet faulted in takes the slow path, which gives up when
//! the process has a fatal signal pending, and the kernel then ends the
//! request with `EIO` (`fuse_dev_do_read`): a worker killed at that instant
//! fails the loop device's read or write instead of leaving it to be sent
//! again to the next worker (`FUSE_NOTIFY_RESEND`). fuser allocates each
//! session thread's buffer zeroed (16 MiB + 4 KiB, fresh anonymous memory, so
//! no page of it is present), and a new worker's threads meet that at their
//! first requests: the worker-kill test saw 0–3 failed writes per 20 kills,
//! and once a failed read.
//!
//! [`PrefaultAlloc`] is a global allocator (the `obd` binary installs it) that
//! passes everything to the system allocator, except that a zeroed allocation
//! of at least [`LARGE`] bytes gets its first [`set`] bytes populated writable
//! (`MADV_POPULATE_WRITE`) and locked in memory where allowed. The FUSE
//! frontend sets that to the largest request before it starts a session, so
//! the part of each buffer a request can reach is present from the start.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Smallest zeroed allocation whose head is populated: fuser's request
/// buffer is 16 MiB + 4 KiB; nothing else this large is allocated zeroed on
/// a request's path.
pub const LARGE: usize = 16 << 20;

/// Bytes of each large zeroed allocation to populate (0: none).
static HEAD: AtomicUsize = AtomicUsize::new(0);

/// Populates the first `bytes` of every large zeroed allocation made from now
/// on (the frontend: the largest request plus its header).
pub fn set(bytes: usize) {
    HEAD.fetch_max(bytes, Ordering::Relaxed);
}

/// The system allocator, populating the head of large zeroed allocations.
pub struct PrefaultAlloc;

// SAFETY: every method forwards to `System` with the caller's arguments; the
// only addition (`populate`) touches no memory the allocation does not own.
unsafe impl GlobalAlloc for PrefaultAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && layout.size() >= LARGE {
            let head = HEAD.load(Ordering::Relaxed).min(layout.size());
            if head > 0 {
                // SAFETY: `[p, p + head)` lies inside the allocation just made.
                unsafe { populate(p, head) };
            }
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Makes the whole pages inside `[p, p + len)` present and writable, and
/// locks them where the process may (best effort: a failure leaves them to
/// fault in as before).
///
/// # Safety
/// `[p, p + len)` must be memory this process owns (one live allocation).
unsafe fn populate(p: *mut u8, len: usize) {
    let page = 4096usize;
    let start = (p as usize).next_multiple_of(page);
    let end = (p as usize + len) & !(page - 1);
    if end <= start {
        return;
    }
    let (addr, n) = (start as *mut libc::c_void, end - start);
    // SAFETY: `[start, end)` is page-aligned and inside the caller's
    // allocation; MADV_POPULATE_WRITE only faults pages in (their contents,
    // zeroes, do not change) and mlock only pins them.
    unsafe {
        if libc::madvise(addr, n, libc::MADV_POPULATE_WRITE) != 0 {
            // Kernels before 5.14: write each page's first byte, which is
            // zero already (the allocation is zeroed).
            for a in (start..end).step_by(page) {
                std::ptr::write_volatile(a as *mut u8, 0);
            }
        }
        let _ = libc::mlock(addr, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident pages of `[p, p + len)` (`mincore`).
    fn resident(p: *const u8, len: usize) -> usize {
        let page = 4096;
        let start = (p as usize).next_multiple_of(page);
        let end = (p as usize + len) & !(page - 1);
        let mut vec = vec![0u8; (end - start) / page];
        // SAFETY: the range is page-aligned inside a live allocation and
        // `vec` has one byte per page.
        let r = unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
        assert_eq!(r, 0);
        vec.iter().filter(|b| *b & 1 == 1).count()
    }

    #[test]
    fn the_head_of_a_large_zeroed_allocation_is_present_and_zero() {
        set(1 << 20);
        let layout = Layout::from_size_align(LARGE + 4096, 8).unwrap();
        let a = PrefaultAlloc;
        // SAFETY: a non-zero layout; freed below with the same layout.
        let p = unsafe { a.alloc_zeroed(layout) };
        assert!(!p.is_null());
        // The first MiB is in memory; the rest (untouched) mostly is not.
        assert!(resident(p, 1 << 20) >= 255, "{}", resident(p, 1 << 20));
        // SAFETY: `p` holds `layout.size()` initialised (zeroed) bytes.
        let all = unsafe { std::slice::from_raw_parts(p, layout.size()) };
        assert!(all.iter().all(|b| *b == 0));
        // SAFETY: allocated above with this layout.
        unsafe { a.dealloc(p, layout) };
    }
}
