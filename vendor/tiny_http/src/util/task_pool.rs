use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

/// Manages a collection of threads.
///
/// A new thread is created every time all the existing threads are full.
/// Any idle thread will automatically die after a few seconds.
pub struct TaskPool {
    sharing: Arc<Sharing>,
}

struct Sharing {
    // threads kept waiting for tasks however long they wait
    min_threads: usize,

    // list of the tasks to be done by worker threads
    todo: Mutex<VecDeque<Box<dyn FnMut() + Send>>>,

    // condvar that will be notified whenever a task is added to `todo`
    condvar: Condvar,

    // number of total worker threads running
    active_tasks: AtomicUsize,

    // number of idle worker threads
    waiting_tasks: AtomicUsize,
}

struct Registration<'a> {
    nb: &'a AtomicUsize,
}

impl<'a> Registration<'a> {
    fn new(nb: &'a AtomicUsize) -> Registration<'a> {
        nb.fetch_add(1, Ordering::Release);
        Registration { nb }
    }
}

impl<'a> Drop for Registration<'a> {
    fn drop(&mut self) {
        self.nb.fetch_sub(1, Ordering::Release);
    }
}

impl TaskPool {
    /// A pool that keeps `min_threads` threads ready.
    pub fn new(min_threads: usize) -> TaskPool {
        let pool = TaskPool {
            sharing: Arc::new(Sharing {
                min_threads,
                todo: Mutex::new(VecDeque::new()),
                condvar: Condvar::new(),
                active_tasks: AtomicUsize::new(0),
                waiting_tasks: AtomicUsize::new(0),
            }),
        };

        for _ in 0..min_threads {
            if let Err(e) = pool.add_thread(None) {
                log::warn!("cannot start a ready thread: {e}");
                break;
            }
        }

        pool
    }

    /// Executes a function in a thread.
    /// If no thread is available, spawns a new one; if that fails (the process is out of
    /// threads), the function is dropped unrun and the error returned.
    pub fn spawn(&self, code: Box<dyn FnMut() + Send>) -> std::io::Result<()> {
        let mut queue = self.sharing.todo.lock().unwrap();

        // failover-proxy patch: a thread woken for a task already queued still counts as
        // waiting until it runs, so `== 0` let a burst of connections queue behind threads
        // that were all spoken for; those connections then waited for an unrelated one to
        // close. Spawn unless there are more idle threads than tasks already queued.
        if self.sharing.waiting_tasks.load(Ordering::Acquire) <= queue.len() {
            drop(queue);
            self.add_thread(Some(code))
        } else {
            queue.push_back(code);
            self.sharing.condvar.notify_one();
            Ok(())
        }
    }

    fn add_thread(&self, initial_fn: Option<Box<dyn FnMut() + Send>>) -> std::io::Result<()> {
        let sharing = self.sharing.clone();

        let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
            let sharing = sharing;
            let _active_guard = Registration::new(&sharing.active_tasks);

            if let Some(mut f) = initial_fn {
                f();
            }

            loop {
                let mut task: Box<dyn FnMut() + Send> = {
                    let mut todo = sharing.todo.lock().unwrap();

                    let task;
                    loop {
                        if let Some(poped_task) = todo.pop_front() {
                            task = poped_task;
                            break;
                        }
                        let _waiting_guard = Registration::new(&sharing.waiting_tasks);

                        let received = if sharing.active_tasks.load(Ordering::Acquire)
                            <= sharing.min_threads
                        {
                            todo = sharing.condvar.wait(todo).unwrap();
                            true
                        } else {
                            let (new_lock, waitres) = sharing
                                .condvar
                                .wait_timeout(todo, Duration::from_millis(5000))
                                .unwrap();
                            todo = new_lock;
                            !waitres.timed_out()
                        };

                        if !received && todo.is_empty() {
                            return;
                        }
                    }

                    task
                };

                task();
            }
        });
        spawned.map(drop)
    }
}

impl Drop for TaskPool {
    fn drop(&mut self) {
        self.sharing
            .active_tasks
            .store(999_999_999, Ordering::Release);
        self.sharing.condvar.notify_all();
    }
}
