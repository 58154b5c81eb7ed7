//! A progress bar on stderr for long copies, redrawn in place and only when it changes.

use std::io::Write;

use super::human_size;

const WIDTH: u64 = 40;

/// Progress through `total` bytes.
pub struct Progress {
    enabled: bool,
    total: u64,
    /// Tenths of a percent last drawn.
    drawn: Option<u64>,
}

impl Progress {
    /// A bar over `total` bytes, drawn only when `enabled`.
    pub fn new(enabled: bool, total: u64) -> Self {
        let mut p = Self {
            enabled,
            total,
            drawn: None,
        };
        p.update(0);
        p
    }

    /// `done` of the total bytes are done.
    pub fn update(&mut self, done: u64) {
        if !self.enabled {
            return;
        }
        let permille = match self.total {
            0 => 1000,
            t => (u128::from(done.min(t)) * 1000 / u128::from(t)) as u64,
        };
        if self.drawn == Some(permille) {
            return;
        }
        self.drawn = Some(permille);
        let filled = (permille * WIDTH / 1000) as usize;
        let bar = format!(
            "{}{}",
            "#".repeat(filled),
            " ".repeat(WIDTH as usize - filled)
        );
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            // Padded: a shorter line would leave the end of the previous one visible.
            "\r[{bar}] {:>3}.{}% {:>8} of {}",
            permille / 10,
            permille % 10,
            human_size(done.min(self.total)),
            human_size(self.total)
        );
        let _ = err.flush();
    }

    /// Draws the bar full and ends its line.
    pub fn finish(&mut self) {
        if self.enabled {
            self.update(self.total);
            eprintln!();
        }
    }
}
