//! The subcommands: generate, chat, status, cancel.
use std::collections::HashMap;
use std::io::Write;

use fasa_dbus::{JobProxy, ManagerProxy, JOB_PATH_PREFIX, SHAPE_KEYS};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use zbus::Connection;

use crate::args::{GenerateArgs, SamplingArgs};
use crate::connect::Bus;
use crate::stream::{emit, Format, Prompt, Session};
use crate::Failure;

pub async fn generate(conn: Connection, args: GenerateArgs) -> Result<(), Failure> {
    let text = args.text.join(" ");
    let format = if args.json { Format::Json } else { Format::Text };
    if let Some(model) = &args.model {
        crate::manage::ensure_loaded(&conn, model).await?;
    }
    let mut session = Session::new(conn).await?;
    let options = args.sampling.options();
    if args.raw {
        if args.sampling.system_prompt.is_some() {
            return Err(Failure::Usage("--system-prompt needs the chat template: drop --raw".into()));
        }
        session.run(Prompt::Raw(&text), &options, format).await?;
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.sampling.system_prompt {
            messages.push(("system".to_string(), system.clone()));
        }
        messages.push(("user".to_string(), text));
        session.run(Prompt::Chat(&messages), &options, format).await?;
    }
    Ok(())
}

pub async fn chat(conn: Connection, sampling: SamplingArgs) -> Result<(), Failure> {
    let mut session = Session::new(conn).await?;
    let options = sampling.options();
    let mut history: Vec<(String, String)> = Vec::new();
    if let Some(system) = &sampling.system_prompt {
        history.push(("system".into(), system.clone()));
    }
    let keep = history.len();
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!("Chatting with fasad. /reset forgets the conversation, /exit or Ctrl-D leaves, Ctrl-C stops an answer.");
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let line = tokio::select! {
            line = lines.next_line() => line.map_err(|e| Failure::Other(format!("cannot read stdin: {e}")))?,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(line) = line else { break };
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.truncate(keep);
                eprintln!("(conversation forgotten)");
                continue;
            }
            _ => {}
        }
        history.push(("user".into(), line));
        match session.run(Prompt::Chat(&history), &options, Format::Text).await {
            Ok(ended) => {
                if ended.reason == "length" {
                    eprintln!("(the answer reached max_tokens)");
                }
                history.push(("assistant".into(), ended.text));
            }
            Err(Failure::Interrupted) => {
                // The question stays unanswered: forget it.
                history.pop();
                eprintln!("(stopped)");
            }
            Err(Failure::Daemon(e)) if matches!(e, fasa_dbus::Error::ContextTooLong(_)) => {
                history.pop();
                eprintln!("fasactl: {} — /reset to start over", e.message());
            }
            Err(e) => return Err(e),
        }
    }
    if interactive {
        eprintln!();
    }
    Ok(())
}

pub async fn status(conn: Connection, bus: Bus, json_out: bool) -> Result<(), Failure> {
    let m = ManagerProxy::new(&conn).await?;
    let model = m.model().await?;
    let name = m.model_name().await?;
    let shapes: HashMap<String, u64> = m.shapes().await?;
    let (active, queued, free, max_queued) =
        (m.active_jobs().await?, m.queued_jobs().await?, m.free_slots().await?, m.max_queued_jobs().await?);
    let version = m.version().await?;
    let activations = m.activations().await?;
    let provider = m.execution_provider().await?;
    let (mode, budget, chunks, profile) = (m.attention_mode().await?, m.token_budget().await?, m.dominant_chunks().await?, m.profile_state().await?);
    let (variant, headroom, max_context, max_sessions) = (m.variant().await?, m.memory_headroom().await?, m.max_context().await?, m.max_sessions().await?);
    if json_out {
        return emit(json!({
            "bus": bus.as_str(),
            "version": version,
            "model": model,
            "model_name": name,
            "shapes": shapes,
            "activations": activations,
            "execution_provider": provider,
            "active_jobs": active,
            "queued_jobs": queued,
            "max_queued_jobs": max_queued,
            "free_slots": free,
            "attention": {"mode": mode, "budget": budget, "chunks": chunks},
            "profile": profile,
            "plan": {"variant": variant, "kv_headroom": headroom, "max_context": max_context, "max_sessions": max_sessions},
        }));
    }
    let s = |k: &str| shapes.get(k).map(|v| v.to_string()).unwrap_or_else(|| "?".into());
    println!("model:    {name}");
    println!("file:     {model}");
    println!(
        "shapes:   {} layers, hidden {}, {} heads, {} kv heads, head dim {}, ffn {}, vocab {}, context {}",
        s("layers"),
        s("hidden"),
        s("heads"),
        s("kv_heads"),
        s("head_dim"),
        s("ffn_hidden"),
        s("vocab"),
        s("context")
    );
    println!("cache:    {} sequences x {} tokens", s("max_sequences"), s("max_context"));
    println!("matmuls:  {activations} activations, ONNX Runtime {provider} execution provider");
    println!("attention: {mode} by default (budget {budget} tokens, {chunks} chunks per head); profile {profile}");
    println!("plan:     {variant}, {max_sessions} sessions x {max_context} tokens, {:.1} MiB KV headroom", headroom as f64 / (1u64 << 20) as f64);
    println!("jobs:     {active} active, {queued} queued (at most {max_queued}), {free} free slots");
    println!("fasad:    {version} on the {} bus", bus.as_str());
    // Shapes this fasactl does not know yet.
    for (k, v) in shapes.iter().filter(|(k, _)| !SHAPE_KEYS.contains(&k.as_str())) {
        println!("{k}: {v}");
    }
    Ok(())
}

pub async fn cancel(conn: Connection, job: &str) -> Result<(), Failure> {
    let path = if job.chars().all(|c| c.is_ascii_digit()) { format!("{JOB_PATH_PREFIX}/{job}") } else { job.to_string() };
    if !path.starts_with(&format!("{JOB_PATH_PREFIX}/")) {
        return Err(Failure::Usage(format!("'{job}' is not a job: give {JOB_PATH_PREFIX}/N or N")));
    }
    let proxy = JobProxy::builder(&conn)
        .path(path.clone())
        .map_err(|_| Failure::Usage(format!("'{job}' is not a valid object path")))?
        .build()
        .await?;
    match proxy.cancel().await {
        Err(e) if e.dbus_name().as_deref() == Some("org.freedesktop.DBus.Error.UnknownObject") => {
            Err(Failure::Other(format!("no job {path}: it ended more than a minute ago, or never was")))
        }
        other => Ok(other?),
    }
}
