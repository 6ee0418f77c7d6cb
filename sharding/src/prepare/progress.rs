//! Progress of `prepare` on stderr: an indicatif bar with bytes, documents and tokens per
//! second on a terminal; plain log lines every few seconds otherwise (logs and CI keep a
//! readable record instead of carriage-return noise).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgressMode {
    /// Nothing.
    #[default]
    Off,
    /// A bar when stderr is a terminal, else log lines.
    Auto,
    /// Log lines every ~2 s.
    Lines,
}

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// `total`: input bytes when known (files, not standard input).
    pub fn new(mode: ProgressMode, total: Option<u64>) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = (mode == ProgressMode::Auto && terminal).then(|| {
            let bar = match total {
                Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            };
            let template = if total.is_some() {
                "{spinner} {elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, eta {eta}) {msg}"
            } else {
                "{spinner} {elapsed_precise} {bytes} ({binary_bytes_per_sec}) {msg}"
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            lines: bar.is_none() && mode != ProgressMode::Off,
            bar,
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    /// Rates count from here (the encoding pass, not tokenizer training).
    pub fn restart(&mut self) {
        self.started = Instant::now();
        if let Some(bar) = &self.bar {
            bar.reset_elapsed();
            bar.reset_eta();
        }
    }

    pub fn message(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None if self.lines => eprintln!("{text}"),
            None => {}
        }
    }

    pub fn update(&mut self, bytes: u64, documents: u64, tokens: u64) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rates = format!(
            "{documents} docs ({:.0}/s), {:.2}M tokens ({:.2}M/s)",
            documents as f64 / secs,
            tokens as f64 / 1e6,
            tokens as f64 / 1e6 / secs
        );
        if let Some(bar) = &self.bar {
            bar.set_position(bytes);
            bar.set_message(rates);
        } else if self.lines && self.last_line.elapsed() >= Duration::from_secs(2) {
            self.last_line = Instant::now();
            eprintln!(
                "prepare: {:.1} MB in {secs:.1}s ({:.2} MB/s), {rates}",
                bytes as f64 / 1e6,
                bytes as f64 / 1e6 / secs
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
