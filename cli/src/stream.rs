//! Running one job and printing it as it streams: text, or one JSON object per line.
use std::io::Write;
use std::time::Duration;

use fasa_dbus::{JobProxy, JobSignal, JobSignals, ManagerProxy, BUS_NAME};
use futures_util::StreamExt;
use serde_json::json;
use zbus::zvariant::OwnedObjectPath;
use zbus::Connection;

use crate::Failure;

/// What to send: a chat or a raw prompt.
pub enum Prompt<'a> {
    Chat(&'a [(String, String)]),
    Raw(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// How a job ended, and its text.
pub struct Ended {
    pub reason: String,
    pub text: String,
}

/// A connection subscribed to fasad's job signals, ready to start jobs.
pub struct Session {
    conn: Connection,
    signals: JobSignals,
    manager: ManagerProxy<'static>,
}

impl Session {
    /// Subscribes first, so that no signal of a job started later can be missed.
    pub async fn new(conn: Connection) -> Result<Session, Failure> {
        let signals = JobSignals::subscribe(&conn).await?;
        let manager = ManagerProxy::builder(&conn).destination(signals.service().clone())?.build().await?;
        Ok(Session { conn, signals, manager })
    }

    /// Starts a job, prints it as it streams, and returns how it ended. Ctrl-C cancels the job
    /// (and returns `Failure::Interrupted` once fasad confirms); fasad leaving the bus is an error.
    pub async fn run(&mut self, prompt: Prompt<'_>, options: &fasa_dbus::GenerateOptions, format: Format) -> Result<Ended, Failure> {
        let dbus = zbus::fdo::DBusProxy::new(&self.conn).await?;
        let mut owner_changes = dbus.receive_name_owner_changed_with_args(&[(0, BUS_NAME)]).await?;
        let dict = options.to_dict();
        let job: OwnedObjectPath = match prompt {
            Prompt::Chat(messages) => {
                let messages: Vec<(&str, &str)> = messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
                self.manager.generate(&messages, &dict).await?
            }
            Prompt::Raw(text) => self.manager.complete(text, &dict).await?,
        };
        if format == Format::Json {
            emit(json!({"event": "job", "job": job.as_str()}))?;
        }

        let mut text = String::new();
        let mut interrupted = false;
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        // After Ctrl-C, Finished("cancelled") follows at once; don't wait forever for it.
        let give_up = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(give_up);
        let (reason, error) = loop {
            tokio::select! {
                signal = self.signals.next(&job) => match signal {
                    Some(JobSignal::Chunk(chunk)) => {
                        match format {
                            Format::Text => print_text(&chunk)?,
                            Format::Json => emit(json!({"event": "chunk", "text": chunk}))?,
                        }
                        text.push_str(&chunk);
                    }
                    Some(JobSignal::Finished { reason, error }) => break (reason, error),
                    None => return Err(Failure::Other("the connection to the bus closed".into())),
                },
                _ = &mut ctrl_c, if !interrupted => {
                    interrupted = true;
                    let proxy = JobProxy::builder(&self.conn).destination(self.signals.service().clone())?.path(job.clone())?.build().await?;
                    proxy.cancel().await?;
                    give_up.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(2));
                }
                _ = &mut give_up, if interrupted => break ("cancelled".to_string(), String::new()),
                change = owner_changes.next() => {
                    let gone = change.and_then(|c| c.args().ok().map(|a| a.new_owner().is_none())).unwrap_or(true);
                    if gone {
                        finish_line(format, &text);
                        return Err(Failure::Other("fasad left the bus before the job finished".into()));
                    }
                }
            }
        };
        finish_line(format, &text);
        if format == Format::Json {
            let mut ev = json!({"event": "finished", "job": job.as_str(), "reason": reason, "error": error});
            if let Ok(proxy) = JobProxy::builder(&self.conn).destination(self.signals.service().clone())?.path(job.clone())?.build().await {
                if let (Ok(p), Ok(g), Ok(t)) = (proxy.prompt_tokens().await, proxy.tokens_generated().await, proxy.tokens_per_second().await) {
                    ev["prompt_tokens"] = p.into();
                    ev["tokens_generated"] = g.into();
                    ev["tokens_per_second"] = ((t * 100.0).round() / 100.0).into();
                }
            }
            emit(ev)?;
        }
        if interrupted {
            return Err(Failure::Interrupted);
        }
        match reason.as_str() {
            "failed" => Err(Failure::Other(format!("the job failed: {error}"))),
            "cancelled" => Err(Failure::Other("the job was cancelled (by fasad stopping, or a Cancel call)".into())),
            _ => Ok(Ended { reason, text }),
        }
    }
}

fn print_text(chunk: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(chunk.as_bytes()).and_then(|_| out.flush()).map_err(|e| Failure::Other(format!("cannot write to stdout: {e}")))
}

/// Ends the streamed text with a newline.
fn finish_line(format: Format, text: &str) {
    if format == Format::Text && !text.ends_with('\n') {
        let _ = print_text("\n");
    }
}

pub fn emit(value: serde_json::Value) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}").and_then(|_| out.flush()).map_err(|e| Failure::Other(format!("cannot write to stdout: {e}")))
}
