//! The bad-input suite: well over 1,000 malformed or hostile calls from one client (random
//! option names and values, wrong signatures, oversized strings, unknown members, another
//! caller's job, read-only properties), each answered with an error; then fasad is alive, the
//! other caller's job is untouched, and a normal request is still answered correctly.
use std::collections::HashMap;
use std::time::Duration;

use fasa_dbus::{BUS_NAME, JOB_INTERFACE, MANAGER_INTERFACE, MANAGER_PATH};
use fasa_tests::{describe, Background, Fasad, TestBus};
use zbus::zvariant::Value;
use zbus::Connection;

const CALLS: usize = 1200;

/// xorshift64*: reproducible randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn string(&mut self, max: usize) -> String {
        // No NUL: D-Bus forbids it in strings, and the bus disconnects a client that sends one.
        const POOL: &[char] = &['a', 'Z', '_', ' ', '\n', '\u{1}', 'é', '😀', '\u{202e}', '\'', '"', '<', '%', '\\'];
        let len = self.below(max as u64 + 1) as usize;
        (0..len).map(|_| POOL[self.below(POOL.len() as u64) as usize]).collect()
    }
}

/// What a call must be answered with: a typed error, or any error.
enum Want {
    Typed(&'static str),
    AnyError,
}

async fn call<B>(conn: &Connection, path: &str, iface: &str, member: &str, body: &B) -> Result<(), zbus::Error>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    conn.call_method(Some(BUS_NAME), path, Some(iface), member, body).await.map(|_| ())
}

fn opts<'a>(pairs: Vec<(String, Value<'a>)>) -> HashMap<String, Value<'a>> {
    pairs.into_iter().collect()
}

fn hi() -> Vec<(String, String)> {
    vec![("user".into(), "hi".into())]
}

/// One hostile call, chosen by `kind`; returns what it was (for messages) and the answer.
async fn hostile(conn: &Connection, rng: &mut Rng, kind: u64, victim: &str) -> (String, Want, Result<(), zbus::Error>) {
    let invalid = Want::Typed("dev.fasa.Fasa1.Error.InvalidArgument");
    let m = MANAGER_PATH;
    match kind {
        0 => {
            let key = format!("x{}", rng.string(40));
            let r = call(conn, m, MANAGER_INTERFACE, "Generate", &(hi(), opts(vec![(key.clone(), Value::U32(1))]))).await;
            (format!("unknown option {key:?}"), invalid, r)
        }
        1 => {
            let keys = ["max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "attention", "budget"];
            let key = keys[rng.below(keys.len() as u64) as usize].to_string();
            let value = match (key.as_str(), rng.below(3)) {
                ("stop" | "attention", 0) => Value::Bool(true),
                ("stop" | "attention", 1) => Value::F64(1.0),
                ("stop", _) => Value::from(vec![1u32, 2]),
                ("attention", _) => Value::from(vec!["dense"]),
                (_, 0) => Value::from(rng.string(8)),
                (_, 1) => Value::Bool(false),
                _ => Value::from(vec![1u32]),
            };
            let desc = format!("{key} = {value:?}");
            let r = call(conn, m, MANAGER_INTERFACE, "Generate", &(hi(), opts(vec![(key, value)]))).await;
            (desc, invalid, r)
        }
        2 => {
            let cases: [(&str, Value<'static>); 16] = [
                ("max_tokens", Value::U32(0)),
                ("max_tokens", Value::I32(-5)),
                ("max_tokens", Value::U32(u32::MAX)),
                ("max_tokens", Value::I64(i64::MIN)),
                ("temperature", Value::F64(f64::NAN)),
                ("temperature", Value::F64(f64::INFINITY)),
                ("temperature", Value::F64(-0.5)),
                ("temperature", Value::F64(1e300)),
                ("top_p", Value::F64(0.0)),
                ("top_p", Value::F64(1.0001)),
                ("top_p", Value::F64(f64::NEG_INFINITY)),
                ("top_k", Value::U64(u64::MAX)),
                ("seed", Value::I32(-1)),
                ("budget", Value::U32(0)),
                ("chunks", Value::I64(-3)),
                ("attention", Value::from("telepathy")),
            ];
            let (key, value) = cases[rng.below(cases.len() as u64) as usize].clone();
            let desc = format!("{key} = {value:?}");
            let r = call(conn, m, MANAGER_INTERFACE, "Generate", &(hi(), opts(vec![(key.to_string(), value)]))).await;
            (desc, invalid, r)
        }
        3 => {
            let role = format!("r{}", rng.string(20));
            let r = call(conn, m, MANAGER_INTERFACE, "Generate", &(vec![(role.clone(), "hi".to_string())], opts(vec![]))).await;
            (format!("role {role:?}"), invalid, r)
        }
        4 => {
            let r = call(conn, m, MANAGER_INTERFACE, "Generate", &(Vec::<(String, String)>::new(), opts(vec![]))).await;
            ("no messages".into(), invalid, r)
        }
        5 => {
            let member = if rng.below(2) == 0 { "Generate" } else { "Complete" };
            let r = match rng.below(6) {
                0 => call(conn, m, MANAGER_INTERFACE, member, &(rng.next() as u32,)).await,
                1 => call(conn, m, MANAGER_INTERFACE, member, &(rng.string(30),)).await,
                2 => call(conn, m, MANAGER_INTERFACE, member, &()).await,
                3 => call(conn, m, MANAGER_INTERFACE, member, &("a", "b", "c")).await,
                4 => call(conn, m, MANAGER_INTERFACE, member, &(vec!["x".to_string()], 7i64, true)).await,
                _ => call(conn, m, MANAGER_INTERFACE, member, &(hi(), opts(vec![]), "extra")).await,
            };
            (format!("{member} with a wrong signature"), Want::AnyError, r)
        }
        6 => {
            let big = "y".repeat((1 << 20) + 1 + rng.below(1000) as usize);
            let r = call(conn, m, MANAGER_INTERFACE, "Complete", &(big, opts(vec![]))).await;
            ("a prompt over 1 MiB".into(), Want::Typed("dev.fasa.Fasa1.Error.ContextTooLong"), r)
        }
        7 => {
            let member = ["Frobnicate", "Load", "generate", "Cancel"][rng.below(4) as usize];
            let r = call(conn, m, MANAGER_INTERFACE, member, &()).await;
            (format!("unknown method {member}"), Want::AnyError, r)
        }
        8 => {
            let (member, r) = if rng.below(2) == 0 {
                ("Cancel", call(conn, victim, JOB_INTERFACE, "Cancel", &()).await)
            } else {
                ("GetText", call(conn, victim, JOB_INTERFACE, "GetText", &()).await)
            };
            (format!("{member} on another caller's job"), Want::Typed("dev.fasa.Fasa1.Error.NotPermitted"), r)
        }
        9 => {
            let prop = ["Model", "ModelName", "ActiveJobs", "FreeSlots", "Bogus"][rng.below(5) as usize];
            let r = call(conn, m, "org.freedesktop.DBus.Properties", "Set", &(MANAGER_INTERFACE, prop, Value::from("x"))).await;
            (format!("Set {prop}"), Want::AnyError, r)
        }
        10 => {
            let prop = format!("P{}", rng.string(10));
            let r = call(conn, m, "org.freedesktop.DBus.Properties", "Get", &(MANAGER_INTERFACE, prop.as_str())).await;
            (format!("Get {prop:?}"), Want::AnyError, r)
        }
        11 => {
            let path = format!("/dev/fasa/Fasa1/Job/{}", 1_000_000 + rng.below(1000));
            let r = call(conn, &path, JOB_INTERFACE, "Cancel", &()).await;
            (format!("Cancel on {path}"), Want::AnyError, r)
        }
        12 => {
            let r = call(conn, m, MANAGER_INTERFACE, "Complete", &("", opts(vec![]))).await;
            ("an empty prompt".into(), invalid, r)
        }
        _ => {
            let (desc, stop) = match rng.below(3) {
                0 => ("17 stop strings", (0..17).map(|i| i.to_string()).collect::<Vec<_>>()),
                1 => ("a 300-byte stop string", vec!["s".repeat(300)]),
                _ => ("an empty stop string", vec![String::new()]),
            };
            let r = call(conn, m, MANAGER_INTERFACE, "Generate", &(hi(), opts(vec![("stop".into(), Value::from(stop))]))).await;
            (desc.into(), invalid, r)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hostile_calls_leave_fasad_serving() {
    let bus = TestBus::start();
    let mut fasad = Fasad::start(&bus, &["--max-sequences", "2"]);
    // Another caller's job, running all along.
    let victim = Background::start(&bus, "Tell me a very long story about the history of bread.");
    let conn = zbus::connection::Builder::address(bus.address.as_str()).unwrap().build().await.unwrap();

    let mut rng = Rng(0x5eed_f00d_dead_beef);
    let mut typed = 0;
    for i in 0..CALLS {
        // Oversized prompts are costly to send: one in a hundred.
        let kind = if i % 100 == 99 { 6 } else { loop { let k = rng.below(14); if k != 6 { break k } } };
        let (desc, want, result) = tokio::time::timeout(Duration::from_secs(30), hostile(&conn, &mut rng, kind, &victim.job))
            .await
            .unwrap_or_else(|_| panic!("call {i} (kind {kind}) got no answer within 30 s"));
        let name = match &result {
            Ok(()) => panic!("call {i}: {desc} succeeded; it must be refused"),
            Err(zbus::Error::MethodError(name, _, _)) => name.to_string(),
            Err(zbus::Error::FDO(e)) => zbus::DBusError::name(e.as_ref()).to_string(),
            Err(e) => panic!("call {i}: {desc}: not an error reply: {e}"),
        };
        if let Want::Typed(want) = want {
            assert_eq!(name, want, "call {i}: {desc}: {result:?}");
            typed += 1;
        }
    }
    assert!(typed > CALLS / 2, "only {typed} typed errors");
    assert!(fasad.alive(), "fasad died: {}", fasad.stderr());
    assert!(!fasad.stderr().contains("panicked"), "{}", fasad.stderr());

    // The other caller's job was not disturbed.
    let state = bus.busctl(&["get-property", BUS_NAME, &victim.job, JOB_INTERFACE, "State"]);
    let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
    assert!(state == "s \"running\"" || state == "s \"finished\"", "{state}");
    drop(victim);

    // And a normal request is still answered correctly.
    let out = bus.fasactl(&["generate", "What is the capital of France?"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Paris"), "{}", describe(&out));
}
