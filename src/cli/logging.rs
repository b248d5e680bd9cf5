//! Logging for `serve`: simplelog formats each line, a thread of its own writes it.
//!
//! simplelog's writers make one `write` system call per line, under one mutex shared by
//! every worker; with a line per client request that cost 44 % of the throughput at 16
//! clients. Here simplelog writes into `LineSender`, which hands each finished line to a
//! channel; the writer thread appends lines to buffered stderr and the log file and flushes
//! whenever the channel runs dry, so lines still appear at once when the proxy is quiet.

use crossbeam_channel::{Receiver, Sender, bounded};
use log::LevelFilter;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::Duration;

/// Lines waiting for the writer; past this, logging waits (back-pressure, not memory).
const BACKLOG: usize = 65_536;

/// Room for a usual line (a request's is about 100 bytes), so that it is not regrown.
const LINE: usize = 256;

enum Message {
    Line(Vec<u8>),
    /// Write everything sent before, then answer.
    Flush(Sender<()>),
}

/// simplelog's output: collects one record's pieces and sends the line at its newline.
/// simplelog holds its own mutex for a whole record, so lines never interleave.
struct LineSender {
    pending: Vec<u8>,
    lines: Sender<Message>,
}

impl Write for LineSender {
    /// simplelog writes a record in many small pieces: only each new piece is searched
    /// for the line's end (searching all that was pending, and copying the line out, cost
    /// a sixth of a logged request's instructions), and a finished line is sent as it is.
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            self.pending.extend_from_slice(&rest[..=end]);
            rest = &rest[end + 1..];
            let line = std::mem::replace(&mut self.pending, Vec::with_capacity(LINE));
            self.lines
                .send(Message::Line(line))
                .map_err(|_| io::Error::other("the log writer has stopped"))?;
        }
        self.pending.extend_from_slice(rest);
        Ok(bytes.len())
    }

    /// Waits (a little, at most) until the writer has written every line sent so far:
    /// `serve` calls it before the process exits.
    fn flush(&mut self) -> io::Result<()> {
        let (done, written) = bounded(1);
        self.lines
            .send(Message::Flush(done))
            .map_err(|_| io::Error::other("the log writer has stopped"))?;
        let _late_is_fine = written.recv_timeout(Duration::from_secs(2));
        Ok(())
    }
}

/// Installs the logger: stderr always, `file` too when given (opened for append).
pub fn init(level: LevelFilter, file: Option<&Path>) -> Result<(), String> {
    let file = file
        .map(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))
        })
        .transpose()?;
    let (lines, received) = bounded(BACKLOG);
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_lines(&received, file))
        .map_err(|e| format!("cannot start the log writer: {e}"))?;
    let config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .build();
    let sender = LineSender {
        pending: Vec::with_capacity(LINE),
        lines,
    };
    simplelog::WriteLogger::init(level, config, sender).map_err(|e| format!("logging: {e}"))
}

/// The writer thread: takes every line waiting, writes it to each output, flushes when
/// nothing more is waiting. Ends when the logger is gone. A failed write to one output
/// is dropped: logging must never stop the proxy.
fn write_lines(received: &Receiver<Message>, file: Option<File>) {
    let mut stderr = BufWriter::new(io::stderr());
    let mut file = file.map(BufWriter::new);
    while let Ok(first) = received.recv() {
        let mut acks = Vec::new();
        for message in std::iter::once(first).chain(received.try_iter()) {
            match message {
                Message::Line(line) => {
                    let _ = stderr.write_all(&line);
                    if let Some(f) = file.as_mut() {
                        let _ = f.write_all(&line);
                    }
                }
                Message::Flush(ack) => acks.push(ack),
            }
        }
        let _ = stderr.flush();
        if let Some(f) = file.as_mut() {
            let _ = f.flush();
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_of_a_record_go_out_as_whole_lines() {
        let (lines, received) = bounded(8);
        let mut sender = LineSender {
            pending: Vec::new(),
            lines,
        };
        for piece in [
            "2026-11-25 [INFO] ",
            "one",
            "\ntwo",
            "\n",
            "3\n4\nfi",
            "ve\n",
            "thr",
        ] {
            sender.write_all(piece.as_bytes()).unwrap();
        }
        let got: Vec<Vec<u8>> = received
            .try_iter()
            .map(|m| match m {
                Message::Line(line) => line,
                Message::Flush(_) => panic!("no flush was asked for"),
            })
            .collect();
        assert_eq!(
            got,
            ["2026-11-25 [INFO] one\n", "two\n", "3\n", "4\n", "five\n"]
                .map(|l| l.as_bytes().to_vec())
        );
        assert_eq!(sender.pending, b"thr");
    }
}
