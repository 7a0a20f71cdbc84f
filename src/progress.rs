//! Progress of long work: an indicatif bar on a terminal, and periodic log lines where stderr is
//! not one (a CI log, `nohup`, a pipe), where a bar would show nothing until the work ends.
use indicatif::{ProgressBar, ProgressDrawTarget, TermLike};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a non-terminal gets a progress line.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A progress bar of `len` steps drawn where the user sees it (see the module docs).
pub fn bar(len: u64) -> ProgressBar {
    ProgressBar::with_draw_target(Some(len), draw_target())
}

/// stderr when it is a terminal, else log lines every [`LOG_EVERY`].
pub fn draw_target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::term_like_with_hz(Box::new(LogLines { last: Mutex::new(None) }), 1)
    }
}

/// A `TermLike` that prints the bar's current text as a plain line on stderr at most every
/// [`LOG_EVERY`] (and the first time it is drawn), ignoring cursor movement.
#[derive(Debug)]
struct LogLines {
    last: Mutex<Option<Instant>>,
}

impl LogLines {
    fn line(&self, s: &str) -> std::io::Result<()> {
        let text = s.trim();
        if text.is_empty() {
            return Ok(());
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            eprintln!("{text}");
        }
        Ok(())
    }
}

impl TermLike for LogLines {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.line(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.line(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}
