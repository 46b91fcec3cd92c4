//! Generation through the ONNX Runtime graph on the real default model: greedy chat answer,
//! limits, stop strings, seeded sampling, slot release.
use fasa_engine::{paths, FinishReason, GenerateRequest, LoadOptions, Model, Prompt, SamplingParams, Step};

fn load() -> Model {
    let (m, o) = (paths::default_model(), paths::default_ort_library());
    assert!(m.is_file(), "model missing at {}: run scripts/setup", m.display());
    Model::load(&LoadOptions::new(&m, &o)).expect("load")
}

fn run(model: &mut Model, req: GenerateRequest) -> (String, FinishReason, usize) {
    let mut seq = model.start(req).unwrap();
    let mut text = String::new();
    loop {
        match model.step(&mut seq).unwrap() {
            Step::Text(t) => text.push_str(&t),
            Step::Finished { text: t, reason } => {
                text.push_str(&t);
                return (text, reason, seq.generated_tokens());
            }
        }
    }
}

#[test]
fn greedy_chat_names_paris_and_limits_hold() {
    let mut model = load();
    let free = model.free_slots();
    let (text, reason, _) = run(&mut model, GenerateRequest::chat("What is the capital of France?"));
    eprintln!("answer: {text:?} ({reason:?})");
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(reason, FinishReason::Eos);

    let mut req = GenerateRequest::chat("Count from 1 to 20, separated by commas.");
    req.max_tokens = 5;
    let (_, reason, n) = run(&mut model, req.clone());
    assert_eq!((reason, n), (FinishReason::Length, 5));

    req.max_tokens = 100;
    req.stop = vec!["5".into()];
    let (text, reason, _) = run(&mut model, req);
    assert_eq!(reason, FinishReason::Stop, "{text}");
    assert!(!text.contains('5') && text.contains('4'), "{text}");

    // Same seed, same text; sampling really samples.
    let mut req = GenerateRequest { prompt: Prompt::Raw("Once upon a time".into()), sampling: SamplingParams { temperature: 1.0, top_k: 40, top_p: 0.95, seed: 7 }, max_tokens: 12, stop: vec![], attention: Default::default() };
    let a = run(&mut model, req.clone()).0;
    let b = run(&mut model, req.clone()).0;
    assert_eq!(a, b);
    req.sampling.seed = 8;
    let c = run(&mut model, req).0;
    assert_ne!(a, c);
    assert_eq!(model.free_slots(), free, "every finished sequence returned its slot");
}

#[test]
fn oversized_prompt_is_a_typed_error() {
    let model = load();
    let huge = "word ".repeat(10_000);
    let err = model.start(GenerateRequest { prompt: Prompt::Raw(huge), ..GenerateRequest::chat("") }).err().unwrap();
    assert!(matches!(err, fasa_engine::EngineError::ContextTooLong { .. }), "{err}");
}
