//! fasad, fasactl, gdbus and busctl as separate processes on a private dbus-daemon, with the
//! real default model (set up by scripts/setup; `$FASA_CACHE_DIR` or `$FASA_MODEL` point at it).
//! One daemon serves the whole sequence in `serves_real_clients`, since loading the model is
//! the slow part.
use std::time::{Duration, Instant};

use fasa_tests::{binary, describe, Background, Fasad, TestBus};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `gdbus call` of a manager method; returns (success, stdout+stderr).
fn gdbus_call(bus: &TestBus, method: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["--dest", "dev.fasa.Fasa1", "--object-path", "/dev/fasa/Fasa1", "--method"];
    let full = format!("dev.fasa.Fasa1.Manager.{method}");
    all.push(&full);
    all.extend_from_slice(args);
    let out = bus.gdbus("call", &all);
    (out.status.success(), format!("{}{}", stdout(&out), stderr(&out)))
}

fn property(bus: &TestBus, path: &str, iface: &str, name: &str) -> String {
    let out = bus.busctl(&["get-property", "dev.fasa.Fasa1", path, iface, name]);
    assert!(out.status.success(), "{}", describe(&out));
    stdout(&out).trim().to_string()
}

fn introspect(bus: &TestBus, path: &str) -> String {
    let out = bus.gdbus("introspect", &["--xml", "--dest", "dev.fasa.Fasa1", "--object-path", path]);
    assert!(out.status.success(), "{}", describe(&out));
    stdout(&out)
}

#[test]
fn serves_real_clients() {
    let bus = TestBus::start();
    let mut fasad = Fasad::start(&bus, &["--max-sequences", "2"]);

    // The main job: a greedy answer naming Paris, streamed to stdout.
    let out = bus.fasactl(&["generate", "What is the capital of France?"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout(&out).contains("Paris"), "{}", describe(&out));
    assert!(stdout(&out).ends_with('\n'));

    // --json: one object per line, ending with "finished".
    let out = bus.fasactl(&["generate", "--json", "--max-tokens", "8", "--raw", "The capital of France is"]);
    assert!(out.status.success(), "{}", describe(&out));
    let events: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).expect(l)).collect();
    assert_eq!(events.first().unwrap()["event"], "job");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "finished", "{last}");
    assert!(["length", "eos"].contains(&last["reason"].as_str().unwrap()), "{last}");
    assert!(last["tokens_generated"].as_u64().unwrap() <= 8, "{last}");
    assert!(last["prompt_tokens"].as_u64().unwrap() > 0, "{last}");

    // status: SmolLM2's shapes.
    let out = bus.fasactl(&["status"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    for want in ["30 layers", "9 heads", "3 kv heads", "head dim 64", "vocab 49152", "session bus"] {
        assert!(text.contains(want), "no '{want}' in:\n{text}");
    }
    let out = bus.fasactl(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["shapes"]["layers"], 30);
    assert_eq!(status["free_slots"], 2);

    // gdbus calling the API directly gets a job path.
    let (ok, text) = gdbus_call(&bus, "Generate", &["[('user', 'Say hi.')]", "{'max_tokens': <4>}"]);
    assert!(ok && text.starts_with("(objectpath '/dev/fasa/Fasa1/Job/"), "{text}");
    let (ok, text) = gdbus_call(&bus, "Complete", &["Once upon a time", "@a{sv} {}"]);
    assert!(ok && text.contains("/dev/fasa/Fasa1/Job/"), "{text}");

    // Bad input: typed errors, and the daemon keeps serving.
    let bad: [(&str, &[&str], &str); 7] = [
        ("Generate", &["[('user', 'hi')]", "{'bogus': <1>}"], "dev.fasa.Fasa1.Error.InvalidArgument"),
        ("Generate", &["[('user', 'hi')]", "{'max_tokens': <-5>}"], "dev.fasa.Fasa1.Error.InvalidArgument"),
        ("Generate", &["[('user', 'hi')]", "{'max_tokens': <'ten'>}"], "dev.fasa.Fasa1.Error.InvalidArgument"),
        ("Generate", &["[('user', 'hi')]", "{'temperature': <nan>}"], "dev.fasa.Fasa1.Error.InvalidArgument"),
        ("Generate", &["[('user', 'hi')]", "{'top_p': <1.5>}"], "dev.fasa.Fasa1.Error.InvalidArgument"),
        ("Generate", &["[('wizard', 'hi')]", "@a{sv} {}"], "dev.fasa.Fasa1.Error.InvalidArgument"),
        ("Generate", &["@a(ss) []", "@a{sv} {}"], "dev.fasa.Fasa1.Error.InvalidArgument"),
    ];
    for (method, args, want) in bad {
        let (ok, text) = gdbus_call(&bus, method, args);
        assert!(!ok && text.contains(want), "{method} {args:?}: expected {want}, got: {text}");
    }
    // A wrong signature (gdbus checks types itself, dbus-send does not).
    let out = fasa_tests::run(
        bus.command("dbus-send")
            .arg(format!("--bus={}", bus.address))
            .args(["--print-reply", "--dest=dev.fasa.Fasa1", "/dev/fasa/Fasa1", "dev.fasa.Fasa1.Manager.Generate", "string:hi"]),
        Duration::from_secs(30),
    );
    // zbus answers org.freedesktop.zbus.Error ("Signature mismatch").
    assert!(!out.status.success() && stderr(&out).starts_with("Error org.freedesktop."), "{}", describe(&out));
    let long = "word ".repeat(9000);
    let (ok, text) = gdbus_call(&bus, "Complete", &[&format!("'{long}'"), "@a{sv} {}"]);
    assert!(!ok && text.contains("dev.fasa.Fasa1.Error.ContextTooLong"), "{}", &text[..text.len().min(300)]);
    let out = bus.busctl(&["call", "dev.fasa.Fasa1", "/dev/fasa/Fasa1", "dev.fasa.Fasa1.Manager", "Complete", "sa{sv}", "hi", "1", "temperature", "d", "nan"]);
    assert!(!out.status.success() && stderr(&out).contains("finite"), "{}", describe(&out));
    let out = bus.fasactl(&["generate", "--temperature", "-1", "hi"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("temperature"), "{}", describe(&out));
    let out = bus.fasactl(&["generate", "--top-k", "many", "hi"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));

    // The served interfaces are the checked-in XML.
    let mut served = introspect(&bus, "/dev/fasa/Fasa1");
    let mut bg = Background::start(&bus, "Tell me a long story about a lighthouse keeper.");
    served.push_str(&introspect(&bus, &bg.job));
    // A task object: pulling the installed model only verifies it.
    let out = bus.busctl(&["call", "dev.fasa.Fasa1", "/dev/fasa/Fasa1", "dev.fasa.Fasa1.Manager", "PullModel", "s", "smollm2-135m"]);
    assert!(out.status.success(), "{}", describe(&out));
    let task = stdout(&out).trim().trim_start_matches("o ").trim_matches('"').to_string();
    assert!(task.starts_with("/dev/fasa/Fasa1/Task/"), "{task}");
    served.push_str(&introspect(&bus, &task));
    assert_eq!(
        fasa_dbus::interface_elements(&served, "dev.fasa.Fasa1."),
        fasa_dbus::interface_elements(fasa_dbus::INTROSPECTION_XML, "dev.fasa.Fasa1."),
        "fasad serves other interfaces than dbus/interfaces/dev.fasa.Fasa1.xml"
    );
    // Nothing at / but the ObjectManager (and the standard interfaces).
    // (zbus nests the children's full introspection: look at what comes before them.)
    let root = introspect(&bus, "/");
    let own = &root[..root.find("<node name=").unwrap_or(root.len())];
    assert!(own.contains("org.freedesktop.DBus.ObjectManager") && !own.contains("dev.fasa.Fasa1."), "{root}");

    // Another caller may neither cancel the job nor read its text.
    let out = bus.fasactl(&["cancel", &bg.job]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("NotPermitted"), "{}", describe(&out));
    let out = bus.busctl(&["call", "dev.fasa.Fasa1", &bg.job, "dev.fasa.Fasa1.Job", "GetText"]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert_eq!(property(&bus, &bg.job, "dev.fasa.Fasa1.Job", "State"), "s \"running\"");

    // Ctrl-C cancels the job: fasactl exits 130, the slot is free again within 100 ms.
    assert_eq!(property(&bus, "/dev/fasa/Fasa1", "dev.fasa.Fasa1.Manager", "FreeSlots"), "u 1");
    bg.signal("INT");
    let (status, _) = bg.wait();
    assert_eq!(status.code(), Some(130));
    let t = Instant::now();
    while property(&bus, "/dev/fasa/Fasa1", "dev.fasa.Fasa1.Manager", "FreeSlots") != "u 2" {
        assert!(t.elapsed() < Duration::from_secs(2), "the slot was not freed");
    }

    // A caller that leaves (killed) frees its slot too.
    let mut bg = Background::start(&bus, "Describe the sea in many words.");
    bg.signal("KILL");
    let _ = bg.wait();
    let t = Instant::now();
    while property(&bus, "/dev/fasa/Fasa1", "dev.fasa.Fasa1.Manager", "FreeSlots") != "u 2" {
        assert!(t.elapsed() < Duration::from_secs(2), "the slot of a killed caller was not freed");
    }

    // Still serving, still correct.
    let out = bus.fasactl(&["generate", "What is the capital of France?"]);
    assert!(out.status.success() && stdout(&out).contains("Paris"), "{}", describe(&out));

    // SIGTERM with a job running: the caller hears "cancelled", fasad exits 0 promptly.
    let mut bg = Background::start(&bus, "Write a poem about autumn.");
    let t = Instant::now();
    let status = fasad.terminate(Duration::from_secs(10)).expect("fasad did not exit within 10 s of SIGTERM");
    assert!(status.success(), "fasad exited with {status}: {}", fasad.stderr());
    assert!(t.elapsed() < Duration::from_secs(6), "SIGTERM took {:?}", t.elapsed());
    let (status, events) = bg.wait();
    let finished = events.iter().find(|e| e["event"] == "finished").expect("a finished event");
    assert_eq!(finished["reason"], "cancelled", "{events:?}");
    assert_eq!(status.code(), Some(1));
    assert!(!fasad.stderr().contains("panicked"), "{}", fasad.stderr());
}

#[test]
fn load_errors_are_one_clear_line() {
    let bus = TestBus::start();
    let dir = bus.dir().to_path_buf();
    let cases: [(Vec<String>, &str); 3] = [
        (vec!["--model".into(), dir.join("absent.gguf").display().to_string()], "absent.gguf"),
        (vec!["--ort-lib".into(), dir.join("libonnxruntime.so.0").display().to_string()], "libonnxruntime.so.0"),
        (vec!["--config".into(), dir.join("absent.toml").display().to_string()], "absent.toml"),
    ];
    for (args, names) in cases {
        let out = fasa_tests::run(bus.command(binary("fasad")).arg("--session").args(&args), Duration::from_secs(60));
        let err = stderr(&out);
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("fasad: error:")).collect();
        assert!(!out.status.success(), "{}", describe(&out));
        assert_eq!(errors.len(), 1, "{}", describe(&out));
        assert!(errors[0].contains(names), "{}", describe(&out));
        assert!(!err.contains("panicked"), "{}", describe(&out));
    }
}

#[test]
fn fasactl_says_how_to_start_fasad() {
    let bus = TestBus::start();
    for args in [vec!["status"], vec!["--session", "generate", "hi"]] {
        let out = bus.fasactl(&args);
        assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
        assert!(stderr(&out).contains("fasad is not running") && stderr(&out).contains("fasad --session"), "{}", describe(&out));
    }
    let out = bus.fasactl(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}
