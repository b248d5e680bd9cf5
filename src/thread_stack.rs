//! Giving back the stack pages a thread no longer uses.
//!
//! A connection thread is at its deepest while it connects to an upstream and waits for
//! the answer's head: ureq's call path alone takes about 21 KiB of frames, a TLS handshake
//! more. A stream then keeps the thread for minutes in shallow loops. The kernel keeps
//! every stack page a thread has touched, so each open stream would hold its deepest
//! moment's stack, about 36 KiB, for its whole life: the largest share of its memory.
//! `release_unused` hands the pages below the current frame back to the kernel, as Go's
//! runtime shrinks goroutine stacks and allocators purge unused pages: after
//! `madvise(MADV_DONTNEED)` they read as zeros and are faulted in afresh if the thread
//! goes that deep again.

/// Bytes below `release_unused`'s own local that stay: the rest of its frame and the
/// `madvise` call's live there while it runs.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const KEEP: usize = 2 * 1024;

/// Releases this thread's stack pages below the caller's frame. Does nothing on the main
/// thread (its stack grows on demand) or on other platforms than Linux with glibc.
///
/// Never inlined: its frame must lie below every frame of its caller, whose locals may be
/// anywhere in that frame.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[inline(never)]
pub fn release_unused() {
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    let Some((low, page)) = STACK.with(|stack| *stack.get_or_init(stack_bounds)) else {
        return;
    };
    let end = here.saturating_sub(KEEP) & !(page - 1);
    if end <= low {
        return;
    }
    // SAFETY: [low, end) is this thread's own stack, page-aligned, below every live frame:
    // the callers' frames are above this one, and this frame and the `madvise` call's lie
    // within `KEEP` below `here`. Nothing can refer to that memory: a value there would
    // belong to a function that has returned. On private anonymous memory MADV_DONTNEED
    // only drops the contents, which no code reads before writing. A failure is harmless.
    let _ = unsafe { libc::madvise(low as *mut libc::c_void, end - low, libc::MADV_DONTNEED) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_unused() {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
thread_local! {
    /// This thread's lowest usable stack address and the page size, once asked for.
    static STACK: std::cell::OnceCell<Option<(usize, usize)>> =
        const { std::cell::OnceCell::new() };
}

/// The lowest usable address of this thread's stack (above its guard) and the page size;
/// None on the main thread or on an error.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn stack_bounds() -> Option<(usize, usize)> {
    // SAFETY: plain calls into glibc; `attr` is filled by pthread_getattr_np before it is
    // read and destroyed once, and the out-pointers are valid locals.
    unsafe {
        if libc::getpid() == libc::gettid() {
            return None;
        }
        let page = usize::try_from(libc::sysconf(libc::_SC_PAGESIZE)).ok()?;
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let mut low = std::ptr::null_mut();
        let mut size = 0;
        let got = libc::pthread_attr_getstack(&attr, &mut low, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        (got == 0 && size > 0 && page.is_power_of_two()).then_some((low as usize, page))
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Touches about `depth` × 4 KiB of stack below the caller.
    #[inline(never)]
    fn go_deep(depth: usize) -> u8 {
        let page = std::hint::black_box([depth as u8; 4096]);
        if depth == 0 {
            return page[0];
        }
        go_deep(depth - 1).wrapping_add(page[4095])
    }

    /// Resident KiB of the mapping that holds `address` (/proc/self/smaps).
    fn resident_kib(address: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((start, end)) = range.split_once('-')
                && let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                )
            {
                inside = (start..end).contains(&address);
            } else if inside && let Some(rss) = line.strip_prefix("Rss:") {
                return rss
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .expect("Rss");
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    #[test]
    fn a_thread_gives_back_what_it_touched_below_its_frame_and_keeps_its_frame() {
        std::thread::spawn(|| {
            // A live 8 KiB local of the caller, which must survive.
            let own = std::hint::black_box([7u8; 8192]);
            let at = own.as_ptr() as usize;
            std::hint::black_box(go_deep(64));
            let before = resident_kib(at);
            release_unused();
            let after = resident_kib(at);
            assert!(std::hint::black_box(&own).iter().all(|&b| b == 7));
            assert!(before >= 256, "the recursion touched {before} KiB");
            assert!(
                after <= 64,
                "{after} KiB still resident (before: {before} KiB)"
            );
            // The released pages serve again as stack.
            assert_eq!(go_deep(64), go_deep(64));
        })
        .join()
        .expect("the thread");
    }
}
