// Temporary driver: pulls the real model once (deleted after use).
#[test]
#[ignore]
fn pull_qwen_for_real() {
    let m = fasa_engine::catalog::by_name("qwen2.5-coder-0.5b").unwrap();
    let dir = fasa_engine::paths::models_dir();
    let t = std::time::Instant::now();
    let mut last = None;
    let p = fasa_engine::pull::pull(m, &dir, &mut |p| {
        if last != Some((p.stage, p.part)) { eprintln!("{:?} part {}/{} {} / {} at {:.1}s", p.stage, p.part, p.parts, p.bytes, p.total, t.elapsed().as_secs_f32()); last = Some((p.stage, p.part)); }
    }).unwrap();
    eprintln!("installed {} in {:.1}s", p.display(), t.elapsed().as_secs_f32());
}
