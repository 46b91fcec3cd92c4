//! The bus layer against a private dbus-daemon, with the fake engine: no model needed. Clients
//! are zbus connections in this process; tests/ drives the real binaries.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fasa_dbus::{Error, GenerateOptions, JobProxy, JobSignal, JobSignals, ManagerProxy};
use fasa_engine::{ModelConfig, ModelInfo, RopeLayout};
use fasa_tests::TestBus;
use zbus::object_server::Interface;
use zbus::zvariant::{OwnedObjectPath, Value};
use zbus::Connection;

use super::job::Job;
use super::manager::Manager;
use super::Shared;
use crate::scheduler::{self, fake::FakeEngine, Worker};

fn fake_info() -> ModelInfo {
    ModelInfo {
        path: PathBuf::from("/models/fake.gguf"),
        config: ModelConfig {
            architecture: "llama".into(),
            name: "Fake".into(),
            n_layers: 30,
            hidden: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn_hidden: 1536,
            vocab_size: 49152,
            context_length: 8192,
            rope_theta: 100000.0,
            rms_eps: 1e-5,
            rope_layout: RopeLayout::Adjacent,
            tied_embeddings: true,
            qkv_bias: false,
        },
        max_context: 64,
        max_sequences: 2,
        weight_bytes: 0,
        sha256: String::new(),
    }
}

struct Service {
    _conn: Connection,
    used: Arc<AtomicUsize>,
    _bus_name_owner: tokio::task::JoinHandle<()>,
}

/// fasad's bus side on `bus`, over a fake engine with `slots` slots and a queue of `queue`.
async fn serve(bus: &TestBus, slots: usize, queue: usize, step: Duration) -> Service {
    let engine = FakeEngine::new(slots, step);
    let used = engine.used.clone();
    let Worker { handle, events, .. } = scheduler::spawn(engine, queue).unwrap();
    let shared = Arc::new(Shared::new(handle, 8, queue, Duration::from_secs(60)));
    let manager = Manager { shared: shared.clone(), info: fake_info() };
    let builder = zbus::connection::Builder::address(bus.address.as_str()).unwrap();
    let conn = super::serve(builder, "test", "", manager).await.unwrap();
    tokio::spawn(super::pump(conn.clone(), shared.clone(), events, |_| {}));
    let watcher = tokio::spawn({
        let conn = conn.clone();
        async move {
            super::watch_callers(conn, shared).await.unwrap();
        }
    });
    Service { _conn: conn, used, _bus_name_owner: watcher }
}

async fn client(bus: &TestBus) -> Connection {
    zbus::connection::Builder::address(bus.address.as_str()).unwrap().build().await.unwrap()
}

fn options(o: GenerateOptions) -> HashMap<&'static str, Value<'static>> {
    o.to_dict()
}

/// Subscribes, starts a raw completion and returns the job with its signal stream.
async fn complete(conn: &Connection, prompt: &str, o: GenerateOptions) -> Result<(OwnedObjectPath, JobSignals), Error> {
    let signals = JobSignals::subscribe(conn).await?;
    let manager = ManagerProxy::builder(conn).destination(signals.service().clone())?.build().await?;
    let job = manager.complete(prompt, &options(o)).await?;
    Ok((job, signals))
}

async fn collect(signals: &mut JobSignals, job: &OwnedObjectPath) -> (String, String, String) {
    let mut text = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), signals.next(job)).await.expect("no signal within 10 s") {
            Some(JobSignal::Chunk(t)) => text.push_str(&t),
            Some(JobSignal::Finished { reason, error }) => return (text, reason, error),
            None => panic!("connection closed"),
        }
    }
}

async fn job_proxy<'a>(conn: &Connection, job: &'a OwnedObjectPath) -> JobProxy<'a> {
    JobProxy::builder(conn).path(job.as_ref()).unwrap().build().await.unwrap()
}

async fn free_slots_become(conn: &Connection, want: u32, within: Duration) -> Duration {
    let manager = ManagerProxy::builder(conn).cache_properties(zbus::proxy::CacheProperties::No).build().await.unwrap();
    let t = Instant::now();
    loop {
        if manager.free_slots().await.unwrap() == want {
            return t.elapsed();
        }
        assert!(t.elapsed() < within, "FreeSlots did not return to {want} within {within:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[test]
fn introspection_matches_checked_in_xml() {
    let mut xml = String::from("<node>\n");
    let manager = Manager {
        shared: Arc::new(Shared::new(
            scheduler::spawn(FakeEngine::new(1, Duration::ZERO), 0).unwrap().handle,
            8,
            0,
            Duration::ZERO,
        )),
        info: fake_info(),
    };
    manager.introspect_to_writer(&mut xml, 2);
    let job = Job {
        id: 1,
        owner: zbus::names::UniqueName::try_from(":1.1").unwrap().into(),
        data: Default::default(),
        worker: manager.shared.worker.clone(),
    };
    job.introspect_to_writer(&mut xml, 2);
    xml.push_str("</node>\n");
    let checked_in = concat!(env!("CARGO_MANIFEST_DIR"), "/../dbus/interfaces/dev.fasa.Fasa1.xml");
    if std::env::var_os("FASA_BLESS").is_some() {
        let doc = format!(
            "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n{xml}"
        );
        std::fs::write(checked_in, doc).unwrap();
    }
    let on_disk = std::fs::read_to_string(checked_in).unwrap();
    assert_eq!(
        fasa_dbus::interface_elements(&on_disk, "dev.fasa.Fasa1."),
        fasa_dbus::interface_elements(&xml, "dev.fasa.Fasa1."),
        "dbus/interfaces/dev.fasa.Fasa1.xml differs from the interfaces fasad serves; if the change is meant, \
         run `FASA_BLESS=1 cargo test --release -p fasad introspection` to rewrite it"
    );
}

#[tokio::test]
async fn chunks_go_to_the_caller_only() {
    let bus = TestBus::start();
    let _service = serve(&bus, 2, 2, Duration::from_millis(1)).await;
    let alice = client(&bus).await;
    // Mallory listens to every Job signal she may see.
    let mallory = client(&bus).await;
    let mut spy = JobSignals::subscribe(&mallory).await.unwrap();

    let (job, mut signals) = complete(&alice, "the capital is Paris", GenerateOptions::default()).await.unwrap();
    assert!(job.as_str().starts_with("/dev/fasa/Fasa1/Job/"), "{job}");
    let (text, reason, error) = collect(&mut signals, &job).await;
    assert_eq!((text.as_str(), reason.as_str(), error.as_str()), ("the capital is Paris ", "eos", ""));

    let proxy = job_proxy(&alice, &job).await;
    assert_eq!(proxy.state().await.unwrap(), "finished");
    assert_eq!(proxy.prompt_tokens().await.unwrap(), 4);
    assert_eq!(proxy.tokens_generated().await.unwrap(), 5);
    assert_eq!(proxy.finish_reason().await.unwrap(), "eos");
    assert_eq!(proxy.get_text().await.unwrap(), "the capital is Paris ");

    // Mallory saw nothing, may not read the text, and may not cancel.
    assert!(tokio::time::timeout(Duration::from_millis(200), spy.next(&job)).await.is_err());
    let theirs = job_proxy(&mallory, &job).await;
    assert!(matches!(theirs.get_text().await, Err(Error::NotPermitted(_))));
    assert!(matches!(theirs.cancel().await, Err(Error::NotPermitted(_))));
    // Properties are public: they carry no text.
    assert_eq!(theirs.state().await.unwrap(), "finished");
}

#[tokio::test]
async fn bad_calls_get_typed_errors() {
    let bus = TestBus::start();
    let service = serve(&bus, 1, 0, Duration::from_millis(1)).await;
    let conn = client(&bus).await;
    let manager = ManagerProxy::new(&conn).await.unwrap();
    let mut bogus = HashMap::new();
    bogus.insert("bogus", Value::U32(1));
    assert!(matches!(manager.complete("hi", &bogus).await, Err(Error::InvalidArgument(m)) if m.contains("bogus")));
    let mut nan = HashMap::new();
    nan.insert("temperature", Value::F64(f64::NAN));
    assert!(matches!(manager.complete("hi", &nan).await, Err(Error::InvalidArgument(m)) if m.contains("finite")));
    let mut negative = HashMap::new();
    negative.insert("max_tokens", Value::I32(-3));
    assert!(matches!(manager.complete("hi", &negative).await, Err(Error::InvalidArgument(_))));
    assert!(matches!(manager.generate(&[], &HashMap::new()).await, Err(Error::InvalidArgument(_))));
    assert!(matches!(manager.generate(&[("robot", "hi")], &HashMap::new()).await, Err(Error::InvalidArgument(m)) if m.contains("robot")));
    assert!(matches!(manager.complete("", &HashMap::new()).await, Err(Error::InvalidArgument(_))));
    assert!(matches!(manager.complete("invalid", &HashMap::new()).await, Err(Error::InvalidArgument(_))));
    let huge = "x ".repeat(100);
    let mut max = HashMap::new();
    max.insert("max_tokens", Value::U32(10));
    assert!(matches!(manager.complete(&huge, &max).await, Err(Error::ContextTooLong(_))));
    let oversized = "x".repeat(super::manager::MAX_PROMPT_BYTES + 1);
    assert!(matches!(manager.complete(&oversized, &HashMap::new()).await, Err(Error::ContextTooLong(_))));
    // A wrong signature is refused by zbus itself.
    let reply = conn
        .call_method(Some(fasa_dbus::BUS_NAME), fasa_dbus::MANAGER_PATH, Some(fasa_dbus::MANAGER_INTERFACE), "Complete", &(42u32,))
        .await;
    assert!(reply.is_err());

    // One slot, no queue: the second job is Busy.
    let long = "w ".repeat(40);
    let (job, _signals) = complete(&conn, &long, GenerateOptions { max_tokens: Some(20), ..Default::default() }).await.unwrap();
    let busy = complete(&conn, "a b", GenerateOptions::default()).await.err().unwrap();
    assert!(matches!(busy, Error::Busy(_)), "{busy:?}");
    job_proxy(&conn, &job).await.cancel().await.unwrap();
    // Refused jobs left nothing behind; the service still serves.
    let (job, mut signals) = complete(&conn, "still here", GenerateOptions::default()).await.unwrap();
    assert_eq!(collect(&mut signals, &job).await.0, "still here ");
    let objects = zbus::fdo::ObjectManagerProxy::builder(&conn)
        .destination(fasa_dbus::BUS_NAME)
        .unwrap()
        .path("/")
        .unwrap()
        .build()
        .await
        .unwrap()
        .get_managed_objects()
        .await
        .unwrap();
    let prefix = format!("{}/", fasa_dbus::JOB_PATH_PREFIX);
    let jobs = objects.keys().filter(|p| p.as_str().starts_with(&prefix)).count();
    assert_eq!(jobs, 2, "{:?}", objects.keys().collect::<Vec<_>>());
    assert!(objects.contains_key(&OwnedObjectPath::try_from(fasa_dbus::MANAGER_PATH).unwrap()));
    assert_eq!(service.used.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn cancel_frees_the_slot_quickly() {
    let bus = TestBus::start();
    let service = serve(&bus, 2, 2, Duration::from_millis(20)).await;
    let conn = client(&bus).await;
    let long = "w ".repeat(50);
    let (job, mut signals) = complete(&conn, &long, GenerateOptions { max_tokens: Some(10), ..Default::default() }).await.unwrap();
    // Let it run a little.
    assert!(matches!(signals.next(&job).await, Some(JobSignal::Chunk(_))));
    let proxy = job_proxy(&conn, &job).await;
    let t = Instant::now();
    proxy.cancel().await.unwrap();
    let cancelled = t.elapsed();
    let (_, reason, _) = collect(&mut signals, &job).await;
    assert_eq!(reason, "cancelled");
    assert!(cancelled < Duration::from_millis(100), "Cancel() took {cancelled:?}");
    assert_eq!(service.used.load(Ordering::SeqCst), 0);
    free_slots_become(&conn, 2, Duration::from_millis(100)).await;
    assert_eq!(proxy.state().await.unwrap(), "cancelled");
}

#[tokio::test]
async fn a_caller_leaving_cancels_its_jobs() {
    let bus = TestBus::start();
    let service = serve(&bus, 2, 2, Duration::from_millis(20)).await;
    let watcher = client(&bus).await;
    let leaver = client(&bus).await;
    let long = "w ".repeat(50);
    let (job, mut signals) = complete(&leaver, &long, GenerateOptions { max_tokens: Some(10), ..Default::default() }).await.unwrap();
    assert!(matches!(signals.next(&job).await, Some(JobSignal::Chunk(_))));
    free_slots_become(&watcher, 1, Duration::from_secs(1)).await;
    drop(signals);
    leaver.graceful_shutdown().await;
    let took = free_slots_become(&watcher, 2, Duration::from_millis(500)).await;
    assert!(took < Duration::from_millis(100), "slot freed after {took:?}");
    assert_eq!(service.used.load(Ordering::SeqCst), 0);
    // And the job is gone from the bus.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let introspect = zbus::fdo::IntrospectableProxy::builder(&watcher)
        .destination(fasa_dbus::BUS_NAME)
        .unwrap()
        .path(fasa_dbus::JOB_PATH_PREFIX)
        .unwrap()
        .build()
        .await
        .unwrap()
        .introspect()
        .await
        .unwrap();
    assert!(!introspect.contains("<node name=\"1\""), "{introspect}");
    drop(service);
}

#[tokio::test]
async fn queued_jobs_run_in_turn() {
    let bus = TestBus::start();
    let _service = serve(&bus, 1, 4, Duration::from_millis(1)).await;
    let conn = client(&bus).await;
    let mut jobs = vec![];
    for i in 0..4 {
        jobs.push(complete(&conn, &format!("job {i} says hello"), GenerateOptions::default()).await.unwrap());
    }
    let manager = ManagerProxy::new(&conn).await.unwrap();
    assert_eq!(manager.max_queued_jobs().await.unwrap(), 4);
    for (i, (job, signals)) in jobs.iter_mut().enumerate() {
        assert_eq!(collect(signals, job).await.0, format!("job {i} says hello "));
    }
    let shapes = manager.shapes().await.unwrap();
    assert_eq!((shapes["layers"], shapes["heads"], shapes["kv_heads"]), (30, 9, 3));
    assert_eq!(manager.model_name().await.unwrap(), "Fake");
}

#[tokio::test]
async fn the_text_streams_through_an_fd() {
    use std::io::Read;
    let bus = TestBus::start();
    let _service = serve(&bus, 2, 2, Duration::from_millis(5)).await;
    let conn = client(&bus).await;
    let other = client(&bus).await;
    let words: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let (job, mut signals) =
        complete(&conn, &words.join(" "), GenerateOptions { max_tokens: Some(20), ..Default::default() }).await.unwrap();
    // Open it while the job runs: the text so far comes first, then the rest, then EOF.
    assert!(matches!(signals.next(&job).await, Some(JobSignal::Chunk(_))));
    let fd = job_proxy(&conn, &job).await.open_stream().await.unwrap();
    assert!(matches!(job_proxy(&other, &job).await.open_stream().await, Err(Error::NotPermitted(_))));
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::fs::File::from(std::os::fd::OwnedFd::from(fd)).read_to_string(&mut text).unwrap();
        text
    });
    let (signalled, reason, _) = collect(&mut signals, &job).await;
    let streamed = tokio::task::spawn_blocking(move || reader.join().unwrap()).await.unwrap();
    assert_eq!(reason, "length");
    assert_eq!(streamed, words[..20].iter().map(|w| format!("{w} ")).collect::<String>());
    assert!(streamed.ends_with(&signalled));
    // Opened after the end: the whole text, then EOF.
    let fd = job_proxy(&conn, &job).await.open_stream().await.unwrap();
    let mut again = String::new();
    std::fs::File::from(std::os::fd::OwnedFd::from(fd)).read_to_string(&mut again).unwrap();
    assert_eq!(again, streamed);
}
