//! The explorer driven headless through AccessKit (`egui_kittest`), on the `pixel` fixture
//! model: open, run a short trajectory in the background, move the sliders, hover a patch,
//! compare classes, export, and reopen the saved trajectory without the model.
//!
//! No rendered snapshot: kittest renders only through wgpu, which needs a GPU or a software
//! Vulkan driver that CI machines lack, and would pull wgpu into the explorer's build. The
//! exported PNG (same pictures as the window) is checked instead.
use ditmoe::analysis::SamplerKind;
use eframe::egui;
use eframe::egui::accesskit::Role;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use explorer::app::{Source, Tab};
use explorer::ExplorerApp;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(name)
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("explorer-test-{}-{tag}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn harness(app: ExplorerApp) -> Harness<'static, ExplorerApp> {
    Harness::builder().with_size(egui::vec2(1400.0, 1000.0)).build_ui_state(|ui, app: &mut ExplorerApp| app.show(ui), app)
}

/// Steps the UI until the background run has finished (the UI stays live meanwhile).
fn wait_for_run(h: &mut Harness<'static, ExplorerApp>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    h.step();
    assert!(h.state().is_running(), "the run starts in the background: {}", h.state().status);
    while h.state().is_running() {
        assert!(Instant::now() < deadline, "run did not finish");
        std::thread::sleep(Duration::from_millis(5));
        h.step();
    }
    h.run();
}

#[test]
fn run_browse_compare_and_export() {
    let mut app = ExplorerApp::new(Some(fixture("pixel")));
    assert!(matches!(app.source, Source::Model(_)), "{}", app.status);
    app.settings.sampler = SamplerKind::Ddim;
    app.settings.steps = 5;
    app.settings.guidance = 2.0;
    app.settings.class = 3;
    let mut h = harness(app);
    h.run();
    assert!(h.state().trajectory.is_none());

    h.get_by_label("Run").click();
    wait_for_run(&mut h);
    let (steps, layers, images) = {
        let t = h.state().trajectory.as_ref().expect("a trajectory after the run");
        assert_eq!(t.meta.classes, vec![3]);
        (t.dims().steps, t.dims().layers, t.dims().images)
    };
    assert_eq!((steps, layers, images), (5, 2, 1));
    assert!(h.state().status.starts_with("done"), "{}", h.state().status);

    // The timestep and layer sliders move the view.
    h.get_by_role_and_label(Role::Slider, "timestep").set_value_accesskit(3.0);
    h.get_by_role_and_label(Role::Slider, "layer").set_value_accesskit(1.0);
    h.run();
    assert_eq!((h.state().view.step, h.state().view.layer), (3, 1));
    h.get_by_label_contains("first-choice expert per patch, layer 1");

    // Hovering the top-left patch names it and lists its experts in every layer.
    let caption = h.get_by_label_contains("first-choice expert per patch").rect();
    h.hover_at(caption.left_bottom() + egui::vec2(4.0, 10.0));
    h.run();
    assert_eq!(h.state().hovered_patch, Some(0));
    h.get_by_label_contains("patch 0 (row 0, column 0)");
    let t = h.state().trajectory.as_ref().unwrap();
    let e = t.token_experts(0, 3, 1, 0);
    h.get_by_label_contains(&format!("layer 1: E{} ", e[0]));

    // One class: the comparison asks for a run of all classes, which then fills it.
    h.get_by_label("Class comparison").click();
    h.run();
    assert_eq!(h.state().view.tab, Tab::Classes);
    h.get_by_label_contains("This trajectory has one class");
    h.get_by_label("Run all classes").click();
    wait_for_run(&mut h);
    assert_eq!(h.state().trajectory.as_ref().unwrap().classes(), (0..10).collect::<Vec<_>>());
    assert!(h.query_by_label_contains("This trajectory has one class").is_none());

    // Export the current (class) view, then save the trajectory beside it.
    let dir = scratch("export");
    let png = dir.join("view.png");
    h.state_mut().export_path = png.display().to_string();
    h.run();
    h.get_by_label("Export view PNG").click();
    h.run();
    assert!(h.state().status.starts_with("wrote"), "{}", h.state().status);
    let img = image::open(&png).unwrap();
    assert!(img.width() > 200 && img.height() > 100);
    h.get_by_label("Save trajectory").click();
    h.run();
    let saved = dir.join("view");
    assert!(ditmoe::analysis::is_trajectory_dir(&saved), "{}", h.state().status);

    // The saved trajectory reopens without the model: browsable, not runnable.
    let mut h2 = harness(ExplorerApp::new(Some(saved.clone())));
    h2.run();
    assert!(matches!(h2.state().source, Source::Trajectory(_)));
    assert_eq!(h2.state().trajectory.as_ref().unwrap().dims().images, 10);
    h2.get_by_label("image");
    h2.get_by_label("Run").click();
    h2.run();
    assert!(!h2.state().is_running(), "no runs without a model");
}

#[test]
fn bad_paths_are_reported() {
    let mut h = harness(ExplorerApp::new(Some(PathBuf::from("/nonexistent/model"))));
    h.run();
    assert!(matches!(h.state().source, Source::None));
    assert!(h.state().status.starts_with("error:") && h.state().status.contains("/nonexistent/model"), "{}", h.state().status);
    h.get_by_label_contains("No trajectory yet");
    // Typing a real model path and pressing Open opens it.
    h.state_mut().path = fixture("tiny").display().to_string();
    h.get_by_label("Open").click();
    h.run();
    assert!(matches!(h.state().source, Source::Model(_)), "{}", h.state().status);
    assert!(h.state().status.contains("opened model"));
}

/// A language model folder (an HF model with its tokenizer.json) opens in the text view: the
/// prompt's tokens are routed at once, a new prompt is routed with the Route button, and the
/// view exports as the tokens x layers map.
#[test]
fn a_language_model_routes_its_prompt() {
    let dir = scratch("text");
    let lm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(lm.join("lm/hf-mixtral").join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(lm.join("text/wordlevel-tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut h = harness(ExplorerApp::new(Some(dir.clone())));
    h.step();
    assert!(matches!(h.state().source, Source::Text(_)), "{}", h.state().status);
    assert_eq!(h.state().text_routes.as_ref().map(|r| r.layers.len()), Some(2), "both MoE layers routed");
    h.state_mut().prompt = "the state of the union".into();
    h.get_by_label("Route").click();
    h.step();
    let r = h.state().text_routes.clone().expect("routed");
    assert_eq!(r.pieces.len(), 5, "{}", h.state().status);
    h.get_by_label_contains("first-choice expert of each token");
    let png = dir.join("routes.png");
    h.state_mut().export_path = png.display().to_string();
    h.get_by_label("Export view PNG").click();
    h.step();
    assert!(png.is_file(), "{}", h.state().status);
}
