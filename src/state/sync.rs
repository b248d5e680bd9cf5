//! The mutex of the state the loom models check: `parking_lot`'s in every real build,
//! loom's under `RUSTFLAGS="--cfg loom"`, so the model checker can explore every
//! interleaving of the locks that keep health counts, queue entries and probe claims exact.
//!
//! Why a shim: loom can only schedule what it can see, and it sees only its own
//! primitives. Three locks take `crate::state::sync::Mutex`: an endpoint's health
//! (`src/state/endpoint.rs`), the failure queue (`src/state/failure_queue.rs`) and the
//! probe schedule (`src/state/schedule.rs`). The rest of the crate keeps `parking_lot`
//! (nothing else is modelled). loom's `lock` returns a `LockResult` like std's; the wrapper
//! returns the guard directly, as `parking_lot` does, so the call sites are the same in both
//! builds.
//!
//! The models themselves are in `src/state/models.rs`.

#[cfg(not(loom))]
pub use parking_lot::Mutex;

#[cfg(loom)]
pub use loom_mutex::Mutex;

#[cfg(loom)]
mod loom_mutex {
    /// loom's mutex with `parking_lot`'s signature: `lock` returns the guard. loom never
    /// poisons (a panic fails the model), so there is no error to return.
    #[derive(Debug, Default)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub fn new(value: T) -> Mutex<T> {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }
}
