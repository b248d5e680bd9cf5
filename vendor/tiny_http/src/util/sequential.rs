//! A connection's stream lent to its requests one after another: request N+1's head is
//! read only once request N's body reader is dropped, and its answer written only once
//! request N's writer is dropped.
//!
//! failover-proxy: tiny_http 0.12 handed the stream on through a new channel per request
//! (two per request, each an aligned allocation through `posix_memalign`, seen in
//! per-request profiles). Here each connection has one set of turns, made once: a request
//! takes its number when it is made and waits (a mutex and a condition variable, never
//! waited on when requests are served one at a time on the connection's thread) until the
//! turns reach it.

use std::io::Result as IoResult;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Whose turn it is, and what is shared while no one holds it.
struct Turns<T> {
    state: Mutex<TurnState<T>>,
    changed: Condvar,
}

struct TurnState<T> {
    /// The number of the request whose turn it is.
    turn: u64,
    /// Numbers past `turn` already done (a writer dropped before its turn came).
    done_early: Vec<u64>,
    /// The stream, while no request holds it (readers only).
    stream: Option<T>,
}

impl<T> Turns<T> {
    fn new(stream: Option<T>) -> Arc<Turns<T>> {
        Arc::new(Turns {
            state: Mutex::new(TurnState {
                turn: 0,
                done_early: Vec::new(),
                stream,
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, TurnState<T>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until it is `mine`'s turn.
    fn wait_for(&self, mine: u64) -> MutexGuard<'_, TurnState<T>> {
        let mut state = self.lock();
        while state.turn != mine {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state
    }

    /// Ends `mine`'s turn, or marks it done if its turn has not come yet.
    fn finish(&self, mine: u64) {
        let mut state = self.lock();
        if state.turn != mine {
            state.done_early.push(mine);
            return;
        }
        self.pass_on(state);
    }

    /// Ends the current turn (the caller's) and wakes whoever waits.
    fn pass_on(&self, mut state: MutexGuard<'_, TurnState<T>>) {
        state.turn += 1;
        while let Some(at) = state.done_early.iter().position(|&n| n == state.turn) {
            state.done_early.swap_remove(at);
            state.turn += 1;
        }
        drop(state);
        self.changed.notify_all();
    }
}

pub struct SequentialReaderBuilder<R>
where
    R: Read + Send,
{
    turns: Arc<Turns<R>>,
    next: u64,
}

pub struct SequentialReader<R>
where
    R: Read + Send,
{
    turns: Arc<Turns<R>>,
    mine: u64,
    held: Option<R>,
}

pub struct SequentialWriterBuilder<W>
where
    W: Write + Send,
{
    writer: Arc<Mutex<W>>,
    turns: Arc<Turns<()>>,
    next: u64,
}

pub struct SequentialWriter<W>
where
    W: Write + Send,
{
    writer: Arc<Mutex<W>>,
    turns: Arc<Turns<()>>,
    mine: u64,
    my_turn: bool,
}

impl<R: Read + Send> SequentialReaderBuilder<R> {
    pub fn new(reader: R) -> SequentialReaderBuilder<R> {
        SequentialReaderBuilder {
            turns: Turns::new(Some(reader)),
            next: 0,
        }
    }
}

impl<W: Write + Send> SequentialWriterBuilder<W> {
    pub fn new(writer: W) -> SequentialWriterBuilder<W> {
        SequentialWriterBuilder {
            writer: Arc::new(Mutex::new(writer)),
            turns: Turns::new(None),
            next: 0,
        }
    }

    /// The stream every writer of this sequence writes to.
    pub fn shared(&self) -> Arc<Mutex<W>> {
        self.writer.clone()
    }
}

impl<R: Read + Send> Iterator for SequentialReaderBuilder<R> {
    type Item = SequentialReader<R>;

    fn next(&mut self) -> Option<SequentialReader<R>> {
        self.next += 1;
        Some(SequentialReader {
            turns: self.turns.clone(),
            mine: self.next - 1,
            held: None,
        })
    }
}

impl<W: Write + Send> Iterator for SequentialWriterBuilder<W> {
    type Item = SequentialWriter<W>;

    fn next(&mut self) -> Option<SequentialWriter<W>> {
        self.next += 1;
        Some(SequentialWriter {
            writer: self.writer.clone(),
            turns: self.turns.clone(),
            mine: self.next - 1,
            my_turn: false,
        })
    }
}

impl<R: Read + Send> SequentialReader<R> {
    /// Waits until every reader before this one is dropped, then lends the stream.
    pub fn turn(&mut self) -> &mut R {
        if self.held.is_none() {
            self.held = self.turns.wait_for(self.mine).stream.take();
        }
        self.held
            .as_mut()
            .expect("the stream is back when a reader's turn comes")
    }
}

impl<R: Read + Send> Read for SequentialReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        self.turn().read(buf)
    }
}

impl<W: Write + Send> SequentialWriter<W> {
    /// Waits until every writer before this one is dropped.
    fn wait_turn(&mut self) {
        if !self.my_turn {
            drop(self.turns.wait_for(self.mine));
            self.my_turn = true;
        }
    }
}

impl<W: Write + Send> Write for SequentialWriter<W> {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        self.wait_turn();
        self.writer.lock().unwrap().write(buf)
    }

    fn flush(&mut self) -> IoResult<()> {
        self.wait_turn();
        self.writer.lock().unwrap().flush()
    }
}

impl<R> Drop for SequentialReader<R>
where
    R: Read + Send,
{
    /// Hands the stream to the next reader, once it has come back from the ones before
    /// (the next head must not be read while an earlier body is unread).
    fn drop(&mut self) {
        let mut state = self.turns.wait_for(self.mine);
        if let Some(stream) = self.held.take() {
            state.stream = Some(stream);
        }
        self.turns.pass_on(state);
    }
}

impl<W> Drop for SequentialWriter<W>
where
    W: Write + Send,
{
    fn drop(&mut self) {
        self.turns.finish(self.mine);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn readers_take_the_stream_in_turn() {
        let mut builder = SequentialReaderBuilder::new(Cursor::new(b"abcdef".to_vec()));
        let mut first = builder.next().unwrap();
        let mut second = builder.next().unwrap();
        let mut byte = [0u8; 1];
        first.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"a");
        let waiting = thread::spawn(move || {
            let mut rest = Vec::new();
            second.read_to_end(&mut rest).unwrap();
            rest
        });
        thread::sleep(Duration::from_millis(50));
        first.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"b", "the second reader read before the first was done");
        drop(first);
        assert_eq!(waiting.join().unwrap(), b"cdef");
        let mut third = builder.next().unwrap();
        assert_eq!(third.read(&mut byte).unwrap(), 0);
    }

    #[test]
    fn writers_write_in_turn_even_when_dropped_out_of_order() {
        let mut builder = SequentialWriterBuilder::new(Vec::new());
        let shared = builder.shared();
        let mut first = builder.next().unwrap();
        let second = builder.next().unwrap();
        let mut third = builder.next().unwrap();
        drop(second);
        let waiting = thread::spawn(move || third.write_all(b"3").unwrap());
        thread::sleep(Duration::from_millis(50));
        first.write_all(b"1").unwrap();
        assert_eq!(*shared.lock().unwrap(), b"1");
        drop(first);
        waiting.join().unwrap();
        assert_eq!(*shared.lock().unwrap(), b"13");
        builder.next().unwrap().write_all(b"4").unwrap();
        assert_eq!(*shared.lock().unwrap(), b"134");
    }
}
