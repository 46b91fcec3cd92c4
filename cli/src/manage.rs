//! The commands that manage fasad rather than generate: calibrate, plan, models, load, unload.
//! Long ones (calibrate, models pull) are daemon tasks followed with a progress bar on stderr.
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use fasa_dbus::{ManagerProxy, TaskProxy};
use serde_json::json;
use zbus::zvariant::{OwnedObjectPath, Value};
use zbus::Connection;

use crate::args::ModelsAction;
use crate::stream::emit;
use crate::Failure;

/// Width of the bar in characters.
const BAR: usize = 30;

/// A plain `\r` progress bar on stderr (nothing when stderr is not a terminal, but the last line).
struct Progress {
    label: String,
    tty: bool,
    shown: Option<u32>,
}

impl Progress {
    fn new(label: &str) -> Self {
        Progress { label: label.into(), tty: std::io::IsTerminal::is_terminal(&std::io::stderr()), shown: None }
    }

    fn show(&mut self, fraction: f64) {
        let per_mille = (fraction.clamp(0.0, 1.0) * 1000.0) as u32;
        if !self.tty || self.shown == Some(per_mille) {
            return;
        }
        self.shown = Some(per_mille);
        let filled = per_mille as usize * BAR / 1000;
        eprint!("\r{} [{}{}] {:5.1}%", self.label, "#".repeat(filled), " ".repeat(BAR - filled), per_mille as f64 / 10.0);
        let _ = std::io::stderr().flush();
    }

    fn done(&mut self, state: &str) {
        if self.tty {
            eprintln!();
        }
        eprintln!("{}: {state}", self.label);
    }
}

/// Follows a task until it ends (Ctrl-C cancels it); returns its result.
async fn follow(conn: &Connection, path: OwnedObjectPath, label: &str) -> Result<String, Failure> {
    let task = TaskProxy::builder(conn).path(path)?.cache_properties(zbus::proxy::CacheProperties::No).build().await?;
    let mut bar = Progress::new(label);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut interrupted = false;
    loop {
        let state = task.state().await?;
        if state != "running" {
            bar.done(&state);
            return match state.as_str() {
                "finished" => Ok(task.result().await?),
                "cancelled" if interrupted => Err(Failure::Interrupted),
                "cancelled" => Err(Failure::Other(format!("{label} was cancelled"))),
                _ => Err(Failure::Other(format!("{label} failed: {}", task.error().await?))),
            };
        }
        bar.show(task.progress().await?);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                task.cancel().await?;
            }
        }
    }
}

pub async fn calibrate(conn: Connection, texts: Vec<PathBuf>, output: Option<PathBuf>, max_tokens: Option<u32>, prefix: Option<u32>) -> Result<(), Failure> {
    let absolute = |p: PathBuf| -> Result<String, Failure> {
        std::path::absolute(&p).map(|p| p.display().to_string()).map_err(|e| Failure::Usage(format!("{}: {e}", p.display())))
    };
    let texts: Vec<String> = texts.into_iter().map(absolute).collect::<Result<_, _>>()?;
    let mut options: HashMap<&str, Value<'_>> = HashMap::new();
    if let Some(o) = output {
        options.insert("output", Value::from(absolute(o)?));
    }
    if let Some(n) = max_tokens {
        options.insert("max_tokens", Value::U32(n));
    }
    if let Some(n) = prefix {
        options.insert("prefix", Value::U32(n));
    }
    let manager = ManagerProxy::new(&conn).await?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let task = manager.calibrate(&refs, &options).await?;
    let profile = follow(&conn, task, "calibration").await?;
    println!("{profile}");
    Ok(())
}

pub async fn plan(conn: Connection, headroom: Option<String>, context: Option<u32>, sessions: Option<u32>, json_out: bool) -> Result<(), Failure> {
    let mut options: HashMap<&str, Value<'_>> = HashMap::new();
    if let Some(h) = headroom {
        options.insert("headroom", Value::from(h));
    }
    if let Some(c) = context {
        options.insert("context", Value::U32(c));
    }
    if let Some(s) = sessions {
        options.insert("sessions", Value::U32(s));
    }
    let manager = ManagerProxy::new(&conn).await?;
    let text = match manager.plan(&options).await {
        Ok(t) => t,
        Err(e @ fasa_dbus::Error::DoesNotFit(_)) if json_out => {
            emit(json!({"error": "does-not-fit", "message": e.message()}))?;
            return Err(Failure::Daemon(e));
        }
        Err(e) => return Err(e.into()),
    };
    let plan: serde_json::Value = serde_json::from_str(&text).map_err(|e| Failure::Other(format!("fasad sent a plan that is not JSON: {e}")))?;
    if json_out {
        return emit(plan);
    }
    let mib = |v: &serde_json::Value| v.as_u64().map(|b| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)).unwrap_or_else(|| "?".into());
    println!("variant:   {}", plan["variant"].as_str().unwrap_or("?"));
    println!("context:   {} tokens x {} sessions", plan["max_context"], plan["max_sessions"]);
    println!("attention: budget {} tokens, {} chunks per step from a pool of {}", plan["budget"], plan["chunks"], plan["pool_fcs"]);
    println!(
        "memory:    weights {}, workspace {} (accounted apart); KV cache {} fast + {} slow",
        mib(&plan["bytes"]["weights"]),
        mib(&plan["bytes"]["workspace"]),
        mib(&plan["bytes"]["kv_fast"]),
        mib(&plan["bytes"]["kv_slow"])
    );
    for r in plan["reasons"].as_array().into_iter().flatten() {
        println!("  - {}", r.as_str().unwrap_or_default());
    }
    Ok(())
}

pub async fn models(conn: Connection, action: Option<ModelsAction>) -> Result<(), Failure> {
    let manager = ManagerProxy::new(&conn).await?;
    match action.unwrap_or(ModelsAction::List { json: false }) {
        ModelsAction::List { json: json_out } => {
            let loaded = manager.model().await?;
            let models = manager.list_models().await?;
            if json_out {
                let list: Vec<_> = models
                    .iter()
                    .map(|(name, path, license, installed, size)| json!({"name": name, "path": path, "license": license, "installed": installed, "size": size, "loaded": *path == loaded}))
                    .collect();
                return emit(json!(list));
            }
            println!("{:<24} {:>9} {:<12} {:<10} PATH", "NAME", "SIZE", "LICENSE", "STATE");
            for (name, path, license, installed, size) in models {
                let state = if path == loaded { "loaded" } else if installed { "installed" } else { "-" };
                println!("{name:<24} {:>8.1}M {license:<12} {state:<10} {path}", size as f64 / (1u64 << 20) as f64);
            }
            Ok(())
        }
        ModelsAction::Pull { name } => {
            let task = manager.pull_model(&name).await?;
            let path = follow(&conn, task, &format!("pull {name}")).await?;
            println!("{path}");
            Ok(())
        }
    }
}

pub async fn load(conn: Connection, model: &str) -> Result<(), Failure> {
    let manager = ManagerProxy::new(&conn).await?;
    eprint!("loading {model}...");
    let _ = std::io::stderr().flush();
    let loaded = manager.load_model(model).await;
    eprintln!("{}", if loaded.is_ok() { " done" } else { "" });
    loaded?;
    println!("{}", ManagerProxy::builder(&conn).cache_properties(zbus::proxy::CacheProperties::No).build().await?.model().await?);
    Ok(())
}

pub async fn unload(conn: Connection) -> Result<(), Failure> {
    ManagerProxy::new(&conn).await?.unload_model().await?;
    Ok(())
}

/// Loads `model` unless it is loaded already (by catalog name, file name or path).
pub async fn ensure_loaded(conn: &Connection, model: &str) -> Result<(), Failure> {
    let manager = ManagerProxy::builder(conn).cache_properties(zbus::proxy::CacheProperties::No).build().await?;
    let loaded = manager.model().await?;
    let models = manager.list_models().await?;
    let same = !loaded.is_empty() && (loaded == model || models.iter().any(|(name, path, ..)| name == model && *path == loaded));
    if !same {
        manager.load_model(model).await?;
    }
    Ok(())
}
