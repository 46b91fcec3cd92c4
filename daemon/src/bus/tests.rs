//! The bus layer against a private dbus-daemon, with the real default model and ONNX Runtime
//! (crate::testing lends one model to one test at a time). Clients are zbus connections in
//! this process; tests/ drives the real binaries.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fasa_dbus::{Error, GenerateOptions, JobProxy, JobSignal, JobSignals, ManagerProxy, TaskProxy};
use fasa_engine::attention::CachePool;
use fasa_tests::TestBus;
use zbus::object_server::Interface;
use zbus::zvariant::{OwnedObjectPath, Value};
use zbus::Connection;

use super::job::Job;
use super::manager::Manager;
use super::task::{Task, TaskData};
use super::{Settings, Shared};
use crate::scheduler::{self, Limits, Worker, WorkerConfig};
use crate::testing::{self, TestModel};

/// Greedy, long: still running when a test cancels it or leaves.
const LONG: u32 = 2000;

struct Service {
    _conn: Connection,
    pool: Arc<CachePool>,
    shared: Arc<Shared>,
    worker: Option<scheduler::WorkerHandle>,
    thread: Option<std::thread::JoinHandle<Option<fasa_engine::Model>>>,
    lease: TestModel,
    _watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        // Hand the model back for the next test.
        if let (Some(w), Some(t)) = (self.worker.take(), self.thread.take()) {
            w.shutdown();
            self.lease.put(t.join().ok().flatten());
        }
    }
}

/// fasad's bus side on `bus`, over the real model with `sessions` sessions and a queue of `queue`.
async fn serve(bus: &TestBus, sessions: usize, queue: usize) -> Service {
    let mut lease = testing::lease();
    let loaded = lease.take();
    let pool = loaded.status.pool.clone();
    let status = loaded.status.clone();
    let config = WorkerConfig { max_queue: queue, limits: Limits::slots(sessions), keep_alive: None, reload: None };
    let Worker { handle, events, thread } = scheduler::spawn(Some(loaded), config).unwrap();
    let shared = Arc::new(Shared::new(handle.clone(), 8, queue, Duration::from_secs(60), Settings::session()));
    shared.set_model(Some(status));
    *shared.spec.lock().unwrap() = Some(testing::spec());
    let manager = Manager { shared: shared.clone() };
    let builder = zbus::connection::Builder::address(bus.address.as_str()).unwrap();
    let conn = super::serve(builder, "test", "", manager).await.unwrap();
    tokio::spawn(super::pump(conn.clone(), shared.clone(), events, |_| {}));
    let watcher = tokio::spawn({
        let (conn, shared) = (conn.clone(), shared.clone());
        async move {
            super::watch_callers(conn, shared).await.unwrap();
        }
    });
    Service { _conn: conn, pool, shared, worker: Some(handle), thread: Some(thread), lease, _watcher: watcher }
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
    let worker = scheduler::spawn(None, WorkerConfig { max_queue: 0, limits: Limits::slots(1), keep_alive: None, reload: None }).unwrap();
    let manager = Manager { shared: Arc::new(Shared::new(worker.handle.clone(), 8, 0, Duration::ZERO, Settings::session())) };
    manager.introspect_to_writer(&mut xml, 2);
    let job = Job {
        id: 1,
        owner: zbus::names::UniqueName::try_from(":1.1").unwrap().into(),
        data: Default::default(),
        worker: manager.shared.worker.clone(),
    };
    job.introspect_to_writer(&mut xml, 2);
    let task = Task {
        id: 2,
        kind: "calibrate",
        owner: None,
        data: Arc::new(std::sync::Mutex::new(TaskData { state: fasa_dbus::JobState::Running, progress: 0.0, result: String::new(), error: String::new() })),
        cancel: Default::default(),
    };
    task.introspect_to_writer(&mut xml, 2);
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

fn max(n: u32) -> GenerateOptions {
    GenerateOptions { max_tokens: Some(n), ..Default::default() }
}

#[tokio::test]
async fn chunks_go_to_the_caller_only() {
    let bus = TestBus::start();
    let _service = serve(&bus, 2, 2).await;
    let alice = client(&bus).await;
    // Mallory listens to every Job signal she may see.
    let mallory = client(&bus).await;
    let mut spy = JobSignals::subscribe(&mallory).await.unwrap();

    let (job, mut signals) = complete(&alice, "The capital of France is", max(6)).await.unwrap();
    assert!(job.as_str().starts_with("/dev/fasa/Fasa1/Job/"), "{job}");
    let (text, reason, error) = collect(&mut signals, &job).await;
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!((reason.as_str(), error.as_str()), ("length", ""));

    let proxy = job_proxy(&alice, &job).await;
    assert_eq!(proxy.state().await.unwrap(), "finished");
    assert!(proxy.prompt_tokens().await.unwrap() > 3);
    assert_eq!(proxy.tokens_generated().await.unwrap(), 6);
    assert_eq!(proxy.finish_reason().await.unwrap(), "length");
    assert_eq!(proxy.get_text().await.unwrap(), text);

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
    let service = serve(&bus, 1, 0).await;
    let start_free = service.pool.free_count();
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
    let chunks = GenerateOptions { attention: Some("fasa".into()), chunks: Some(1000), ..Default::default() };
    assert!(matches!(manager.complete("hi", &options(chunks)).await, Err(Error::InvalidArgument(m)) if m.contains("chunks")));
    let huge = "word ".repeat(2 * testing::CONTEXT);
    assert!(matches!(manager.complete(&huge, &options(max(10))).await, Err(Error::ContextTooLong(_))));
    let oversized = "x".repeat(super::manager::MAX_PROMPT_BYTES + 1);
    assert!(matches!(manager.complete(&oversized, &HashMap::new()).await, Err(Error::ContextTooLong(_))));
    // A wrong signature is refused by zbus itself.
    let reply = conn
        .call_method(Some(fasa_dbus::BUS_NAME), fasa_dbus::MANAGER_PATH, Some(fasa_dbus::MANAGER_INTERFACE), "Complete", &(42u32,))
        .await;
    assert!(reply.is_err());
    // Calibrate and Plan check their options too.
    let mut odd = HashMap::new();
    odd.insert("colour", Value::from("red"));
    assert!(matches!(manager.calibrate(&[], &odd).await, Err(Error::InvalidArgument(m)) if m.contains("colour")));
    assert!(matches!(manager.calibrate(&["/nonexistent/text"], &HashMap::new()).await, Err(Error::InvalidArgument(m)) if m.contains("/nonexistent/text")));
    assert!(matches!(manager.plan(&odd).await, Err(Error::InvalidArgument(_))));

    // One session, no queue: the second job is Busy.
    let (job, _signals) = complete(&conn, "Once upon a time", max(LONG)).await.unwrap();
    let busy = complete(&conn, "The capital of France is", GenerateOptions::default()).await.err().unwrap();
    assert!(matches!(busy, Error::Busy(_)), "{busy:?}");
    job_proxy(&conn, &job).await.cancel().await.unwrap();
    // Refused jobs left nothing behind; the service still serves.
    let (job, mut signals) = complete(&conn, "The capital of France is", max(4)).await.unwrap();
    assert!(collect(&mut signals, &job).await.0.contains("Paris"));
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
    assert_eq!(service.pool.free_count(), start_free);
}

#[tokio::test]
async fn cancel_frees_the_slot_quickly() {
    let bus = TestBus::start();
    let service = serve(&bus, 2, 2).await;
    let start_free = service.pool.free_count();
    let conn = client(&bus).await;
    let (job, mut signals) = complete(&conn, "Once upon a time", max(LONG)).await.unwrap();
    // Let it run a little.
    assert!(matches!(signals.next(&job).await, Some(JobSignal::Chunk(_))));
    let proxy = job_proxy(&conn, &job).await;
    let t = Instant::now();
    proxy.cancel().await.unwrap();
    let cancelled = t.elapsed();
    let (_, reason, _) = collect(&mut signals, &job).await;
    assert_eq!(reason, "cancelled");
    assert!(cancelled < Duration::from_millis(100), "Cancel() took {cancelled:?}");
    assert_eq!(service.pool.free_count(), start_free);
    free_slots_become(&conn, 2, Duration::from_millis(100)).await;
    assert_eq!(proxy.state().await.unwrap(), "cancelled");
}

#[tokio::test]
async fn a_caller_leaving_cancels_its_jobs() {
    let bus = TestBus::start();
    let service = serve(&bus, 2, 2).await;
    let start_free = service.pool.free_count();
    let watcher = client(&bus).await;
    let leaver = client(&bus).await;
    let (job, mut signals) = complete(&leaver, "Once upon a time", max(LONG)).await.unwrap();
    assert!(matches!(signals.next(&job).await, Some(JobSignal::Chunk(_))));
    free_slots_become(&watcher, 1, Duration::from_secs(1)).await;
    drop(signals);
    leaver.graceful_shutdown().await;
    let took = free_slots_become(&watcher, 2, Duration::from_millis(500)).await;
    assert!(took < Duration::from_millis(100), "slot freed after {took:?}");
    assert_eq!(service.pool.free_count(), start_free);
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
}

#[tokio::test]
async fn queued_jobs_run_in_turn_and_the_manager_shows_the_model() {
    let bus = TestBus::start();
    let _service = serve(&bus, 1, 4).await;
    let conn = client(&bus).await;
    let mut jobs = vec![];
    for _ in 0..3 {
        jobs.push(complete(&conn, "The capital of France is", max(4)).await.unwrap());
    }
    let manager = ManagerProxy::new(&conn).await.unwrap();
    assert_eq!(manager.max_queued_jobs().await.unwrap(), 4);
    let mut answers = vec![];
    for (job, signals) in jobs.iter_mut() {
        answers.push(collect(signals, job).await.0);
    }
    assert!(answers.iter().all(|a| a == &answers[0] && a.contains("Paris")), "{answers:?}");
    let shapes = manager.shapes().await.unwrap();
    assert_eq!((shapes["layers"], shapes["heads"], shapes["kv_heads"]), (30, 9, 3));
    let name = manager.model_name().await.unwrap();
    assert!(name.to_lowercase().contains("smollm2"), "{name}");
    assert_eq!(manager.profile_state().await.unwrap(), "uncalibrated");
    assert_eq!(manager.attention_mode().await.unwrap(), "fasa");
    assert_eq!(manager.activations().await.unwrap(), "int8");
    assert_eq!(manager.execution_provider().await.unwrap(), "cpu");
    assert_eq!((manager.token_budget().await.unwrap(), manager.dominant_chunks().await.unwrap()), (256, 12));
    // The plan for the loaded model's shapes, at a headroom given.
    let mut o = HashMap::new();
    o.insert("headroom", Value::from("100MiB"));
    o.insert("sessions", Value::U32(1));
    o.insert("context", Value::U32(4096));
    let plan: serde_json::Value = serde_json::from_str(&manager.plan(&o).await.unwrap()).unwrap();
    assert_eq!(plan["variant"], "dense", "{plan}");
    assert!(plan["max_context"].as_u64().unwrap() < 4096, "{plan}");
    o.insert("headroom", Value::U64(1000));
    assert!(matches!(manager.plan(&o).await, Err(Error::DoesNotFit(m)) if m.contains("smallest plan")));
    // The models fasad knows.
    let models = manager.list_models().await.unwrap();
    assert!(models.iter().any(|(name, _, license, _, size)| name == "smollm2-135m" && license == "Apache-2.0" && *size == 98_362_432), "{models:?}");
}

#[tokio::test]
async fn unload_then_load_by_name() {
    let bus = TestBus::start();
    let _service = serve(&bus, 1, 1).await;
    let conn = client(&bus).await;
    let manager = ManagerProxy::builder(&conn).cache_properties(zbus::proxy::CacheProperties::No).build().await.unwrap();
    manager.unload_model().await.unwrap();
    assert_eq!(manager.model().await.unwrap(), "");
    let e = complete(&conn, "The capital of France is", max(2)).await.err().unwrap();
    assert!(matches!(e, Error::ModelNotLoaded(_)), "{e:?}");
    assert!(matches!(manager.unload_model().await, Err(Error::ModelNotLoaded(_))));
    assert!(matches!(manager.load_model("no-such-model").await, Err(Error::InvalidArgument(m)) if m.contains("smollm2-135m")));
    let path = fasa_engine::paths::default_model();
    manager.load_model(&path.display().to_string()).await.unwrap();
    assert_eq!(manager.model().await.unwrap(), path.display().to_string());
    let (job, mut signals) = complete(&conn, "The capital of France is", max(4)).await.unwrap();
    assert!(collect(&mut signals, &job).await.0.contains("Paris"));
}

#[tokio::test]
async fn calibration_is_a_task_with_progress() {
    let bus = TestBus::start();
    let service = serve(&bus, 1, 1).await;
    let state = tempfile::tempdir().unwrap();
    service.shared.spec.lock().unwrap().as_mut().unwrap().state_dir = state.path().to_path_buf();
    let conn = client(&bus).await;
    let manager = ManagerProxy::builder(&conn).cache_properties(zbus::proxy::CacheProperties::No).build().await.unwrap();
    // Finished goes to the caller only.
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface(fasa_dbus::TASK_INTERFACE)
        .unwrap()
        .member("Finished")
        .unwrap()
        .build();
    let mut finished = zbus::MessageStream::for_match_rule(rule.clone(), &conn, Some(16)).await.unwrap();
    let spy = client(&bus).await;
    let mut spied = zbus::MessageStream::for_match_rule(rule, &spy, Some(16)).await.unwrap();
    let copy = state.path().join("copy.json");
    let mut o = HashMap::new();
    o.insert("max_tokens", Value::U32(160));
    o.insert("prefix", Value::U32(96));
    o.insert("stride", Value::U32(8));
    o.insert("output", Value::from(copy.display().to_string()));
    let path = manager.calibrate(&[], &o).await.unwrap();
    assert!(path.as_str().starts_with(fasa_dbus::TASK_PATH_PREFIX), "{path}");
    // A second one while the first runs is Busy.
    assert!(matches!(manager.calibrate(&[], &o).await, Err(Error::Busy(_))));
    assert_eq!(manager.profile_state().await.unwrap(), "calibrating");
    let task = TaskProxy::builder(&conn).path(path.clone()).unwrap().cache_properties(zbus::proxy::CacheProperties::No).build().await.unwrap();
    assert_eq!(task.kind().await.unwrap(), "calibrate");
    let t = Instant::now();
    while task.state().await.unwrap() == "running" {
        assert!(t.elapsed() < Duration::from_secs(120), "calibration did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(task.state().await.unwrap(), "finished", "{}", task.error().await.unwrap());
    assert_eq!(task.progress().await.unwrap(), 1.0);
    let saved = task.result().await.unwrap();
    let sha = service.shared.model().unwrap().info.sha256;
    assert!(saved.ends_with(&format!("profiles/{sha}.json")), "{saved}");
    {
        use futures_util::StreamExt;
        let msg = tokio::time::timeout(Duration::from_secs(5), finished.next()).await.expect("no Finished").unwrap().unwrap();
        let (state, result, error): (String, String, String) = msg.body().deserialize().unwrap();
        assert_eq!((state.as_str(), result.as_str(), error.as_str()), ("finished", saved.as_str(), ""));
        assert!(tokio::time::timeout(Duration::from_millis(200), spied.next()).await.is_err(), "another peer saw Finished");
    }
    let profile = fasa_engine::attention::Profile::load(std::path::Path::new(&saved)).unwrap();
    assert!(!profile.uncalibrated);
    assert!(copy.exists());
    assert_eq!(manager.profile_state().await.unwrap(), "calibrated");
    assert!(!service.pool.profile().uncalibrated, "the profile was not applied to the serving model");

    // Cancelled: only by its caller; the saved profile stays.
    let other = client(&bus).await;
    let path = manager.calibrate(&[], &HashMap::new()).await.unwrap();
    let theirs = TaskProxy::builder(&other).path(path.clone()).unwrap().build().await.unwrap();
    assert!(matches!(theirs.cancel().await, Err(Error::NotPermitted(_))));
    let task = TaskProxy::builder(&conn).path(path).unwrap().cache_properties(zbus::proxy::CacheProperties::No).build().await.unwrap();
    task.cancel().await.unwrap();
    let t = Instant::now();
    while task.state().await.unwrap() == "running" {
        assert!(t.elapsed() < Duration::from_secs(30), "the calibration was not cancelled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(task.state().await.unwrap(), "cancelled");
    assert_eq!(manager.profile_state().await.unwrap(), "calibrated");
    assert!(std::path::Path::new(&saved).exists());
}

#[tokio::test]
async fn the_text_streams_through_an_fd() {
    use std::io::Read;
    let bus = TestBus::start();
    let _service = serve(&bus, 2, 2).await;
    let conn = client(&bus).await;
    let other = client(&bus).await;
    let (job, mut signals) = complete(&conn, "Once upon a time", max(20)).await.unwrap();
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
    assert!(["length", "eos"].contains(&reason.as_str()), "{reason}");
    assert_eq!(streamed, job_proxy(&conn, &job).await.get_text().await.unwrap());
    assert!(streamed.ends_with(&signalled));
    // Opened after the end: the whole text, then EOF.
    let fd = job_proxy(&conn, &job).await.open_stream().await.unwrap();
    let mut again = String::new();
    std::fs::File::from(std::os::fd::OwnedFd::from(fd)).read_to_string(&mut again).unwrap();
    assert_eq!(again, streamed);
}
