//! The load test: 8 clients × 10 requests at once against one fasad (4 cache slots, the rest
//! queued), each answer equal to the same request's answer alone (greedy decoding does not
//! depend on what else runs). Prints fasad's peak RSS for bench/RESULTS.md.
use std::time::Instant;

use fasa_tests::{describe, Fasad, TestBus};

const CLIENTS: usize = 8;
const REQUESTS: usize = 10;
const PROMPTS: [&str; CLIENTS] = [
    "The capital of France is",
    "One, two, three, four,",
    "The opposite of hot is",
    "Water boils at",
    "The first month of the year is",
    "A baby cat is called a",
    "The largest planet in the solar system is",
    "Roses are red, violets are",
];

fn answer(bus: &TestBus, prompt: &str) -> String {
    let out = bus.fasactl(&["generate", "--raw", "--max-tokens", "8", prompt]);
    assert!(out.status.success(), "{prompt}: {}", describe(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// Peak resident memory of a process, from /proc (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn eight_clients_ten_requests_each() {
    let bus = TestBus::start();
    let mut fasad = Fasad::start(&bus, &["--max-sequences", "4", "--max-queue", "16"]);
    let expected: Vec<String> = PROMPTS.iter().map(|p| answer(&bus, p)).collect();

    let t = Instant::now();
    std::thread::scope(|s| {
        for (client, prompt) in PROMPTS.iter().enumerate() {
            let (bus, expected) = (&bus, &expected);
            s.spawn(move || {
                for request in 0..REQUESTS {
                    let got = answer(bus, prompt);
                    assert_eq!(got, expected[client], "client {client}, request {request}: {prompt:?}");
                }
            });
        }
    });
    let elapsed = t.elapsed();
    assert!(fasad.alive(), "{}", fasad.stderr());
    let out = bus.fasactl(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((status["active_jobs"].as_u64(), status["free_slots"].as_u64()), (Some(0), Some(4)), "{status}");
    eprintln!(
        "load: {CLIENTS} clients x {REQUESTS} requests (8 tokens each) in {:.1} s; fasad peak RSS {:.1} MiB",
        elapsed.as_secs_f64(),
        peak_rss_kib(fasad.pid()) as f64 / 1024.0
    );
}
