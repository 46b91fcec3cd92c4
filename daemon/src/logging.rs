//! Logging through `log`: to journald (with structured fields such as `JOB=`, `MODEL=`,
//! `TOKENS_PER_SECOND=`) when stderr is connected to the journal, as under systemd; to stderr
//! otherwise, one line per record with its fields as `key=value`.
//!
//! `$FASA_LOG` sets the level (`error`, `warn`, `info` (default), `debug`, `trace`).
use std::io::Write;

use log::kv::{Key, Value, VisitSource};
use log::{LevelFilter, Log, Metadata, Record};

/// Installs the logger; returns where logs go, for the first log line.
pub fn init() -> &'static str {
    let level = std::env::var("FASA_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(LevelFilter::Info);
    log::set_max_level(level);
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            if journal.with_syslog_identifier("fasad".into()).install().is_ok() {
                return "journald";
            }
        }
    }
    let _ = log::set_logger(&StderrLogger);
    "stderr"
}

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = format!("fasad: {}: {}", record.level().as_str().to_lowercase(), record.args());
        let _ = record.key_values().visit(&mut Fields(&mut line));
        line.push('\n');
        // One write per record so that lines of concurrent threads do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

struct Fields<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        self.0.push_str(&format!(" {key}={value}"));
        Ok(())
    }
}
