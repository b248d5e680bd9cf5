//! Reading the tail of the log file for `GET /__qcc__/logs` (qcc's log API).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// At most this much of the file's end is read: the API serves a tail, not an archive.
const TAIL_BYTES: u64 = 4 * 1024 * 1024;

/// The last `lines` lines that contain `grep` and are at `min_level` or more severe.
/// A line's level is the first `[LEVEL]` in it, as simplelog writes it.
pub fn tail(
    path: &Path,
    lines: usize,
    min_level: Option<log::Level>,
    grep: &str,
) -> std::io::Result<Vec<String>> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut kept: Vec<String> = text
        .lines()
        .filter(|l| l.contains(grep))
        .filter(|l| min_level.is_none_or(|min| level_of(l).is_some_and(|lv| lv <= min)))
        .map(str::to_string)
        .collect();
    let skip = kept.len().saturating_sub(lines);
    kept.drain(..skip);
    Ok(kept)
}

fn level_of(line: &str) -> Option<log::Level> {
    let start = line.find('[')?;
    let end = start + line[start..].find(']')?;
    line[start + 1..end].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_level_and_text_and_keeps_the_tail() {
        let path = std::env::temp_dir().join(format!("fp-logtail-{}.log", std::process::id()));
        let text = "t [INFO] a one\nt [WARN] b two\nt [DEBUG] c one\nt [ERROR] d one\n";
        std::fs::write(&path, text).unwrap();
        let all = tail(&path, 10, None, "").unwrap();
        assert_eq!(all.len(), 4);
        let warn = tail(&path, 10, Some(log::Level::Warn), "").unwrap();
        assert_eq!(warn, vec!["t [WARN] b two", "t [ERROR] d one"]);
        let one = tail(&path, 1, None, "one").unwrap();
        assert_eq!(one, vec!["t [ERROR] d one"]);
        std::fs::remove_file(&path).unwrap();
    }
}
