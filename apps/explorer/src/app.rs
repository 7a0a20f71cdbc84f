//! `ExplorerApp`: the explorer's state and its UI, one `show` per frame. It is independent of
//! eframe (`show` takes a `Ui`), so the tests drive it headless through `egui_kittest`.
use crate::pictures::color_image;
use crate::views::{class_view, sample_view, state_view, trajectory_view, PICTURE_SIDE};
use crate::worker::{LoadedModel, Poll, Run};
use candle_core::{DType, Device};
use ditmoe::analysis::aggregate::first_choice;
use ditmoe::analysis::colormap::expert_color;
use ditmoe::analysis::figures::{step_figure, timestep_label};
use ditmoe::analysis::heatmap::save_png;
use ditmoe::analysis::{is_trajectory_dir, Progress, RecordRequest, RoutingTrajectory, RunDefaults, SamplerKind};
use ditmoe::checkpoint::ModelDir;
use ditmoe::lm::routes::TokenRoutes;
use ditmoe::lm::LmModel;
use ditmoe::sampling::GuidanceInterval;
use ditmoe::text::Tokenizer;
use eframe::egui::{self, Color32, ComboBox, DragValue, Sense, Slider, Stroke, StrokeKind, TextureHandle, TextureOptions};
use image::RgbImage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The bundled model, opened at start when it is there.
pub const DEFAULT_MODEL: &str = "assets/fashion-mnist";

/// What is open.
#[derive(Debug, Clone)]
pub enum Source {
    None,
    /// A model folder: runs are possible.
    Model(Box<ModelDir>),
    /// A saved trajectory: browsing only.
    Trajectory(PathBuf),
    /// A language model folder with its `tokenizer.json`: prompts are routed.
    Text(Box<TextModel>),
}

/// A language model loaded for routing prompts (on the CPU, f32).
#[derive(Debug, Clone)]
pub struct TextModel {
    pub dir: PathBuf,
    pub model: LmModel,
    pub tokenizer: Tokenizer,
}

impl TextModel {
    /// A folder is a language model when it holds a `tokenizer.json` beside an HF-layout model.
    fn open(dir: &Path) -> Option<candle_core::Result<Self>> {
        if !dir.join(ditmoe::lm::trainer::TOKENIZER_FILE).is_file() {
            return None;
        }
        let plan = ditmoe::ExecutionPlan::inference(&Device::Cpu, ditmoe::Precision::F32);
        Some((|| {
            let model = ditmoe::lm::load_hf(dir, &plan)?;
            let tokenizer = Tokenizer::load(&dir.join(ditmoe::lm::trainer::TOKENIZER_FILE))?;
            Ok(Self { dir: dir.to_path_buf(), model, tokenizer })
        })())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
}

/// The sampling settings of the next run.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub class: usize,
    pub seed: u64,
    pub sampler: SamplerKind,
    pub steps: usize,
    pub guidance: f64,
    /// The noise levels guidance is limited to (the model's generate.json, as `ditmoe generate`
    /// samples); None: every level.
    pub guidance_interval: Option<GuidanceInterval>,
    pub device: DeviceChoice,
    pub dtype: DType,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            class: 0,
            seed: 0,
            sampler: SamplerKind::Ddpm,
            steps: 50,
            guidance: 1.0,
            guidance_interval: None,
            device: DeviceChoice::Cpu,
            dtype: DType::F32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Trajectory,
    Classes,
}

/// Which part of the trajectory is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewState {
    pub tab: Tab,
    /// Evaluation index (0 = first, at the noise end).
    pub step: usize,
    pub layer: usize,
    pub image: usize,
}

/// Uploaded pictures, re-made only when what they show changes.
#[derive(Default)]
struct Textures {
    slots: HashMap<&'static str, (TextureKey, TextureHandle)>,
}

/// What a picture shows: (trajectory generation, and up to three view indices).
type TextureKey = (u64, usize, usize, usize);

impl Textures {
    fn get(&mut self, ctx: &egui::Context, name: &'static str, key: TextureKey, make: impl FnOnce() -> RgbImage) -> TextureHandle {
        if let Some((k, tex)) = self.slots.get(name) {
            if *k == key {
                return tex.clone();
            }
        }
        let tex = ctx.load_texture(name, color_image(&make()), TextureOptions::NEAREST);
        self.slots.insert(name, (key, tex.clone()));
        tex
    }
}

pub struct ExplorerApp {
    /// The path field: a model folder or a saved trajectory folder.
    pub path: String,
    pub source: Source,
    pub settings: Settings,
    pub trajectory: Option<RoutingTrajectory>,
    pub view: ViewState,
    /// The last run's progress while one is in flight.
    pub progress: Option<Progress>,
    /// One line about the last action (opened, finished, an error).
    pub status: String,
    pub export_path: String,
    /// The patch under the pointer in the patch map, if any.
    pub hovered_patch: Option<usize>,
    /// The text view's prompt and its last routing.
    pub prompt: String,
    pub text_routes: Option<TokenRoutes>,
    run: Option<Run>,
    loaded: Option<LoadedModel>,
    /// Bumped for every new trajectory, so cached pictures of the old one are re-made.
    generation: u64,
    textures: Textures,
}

impl ExplorerApp {
    /// Opens `path` when given, else the bundled model when it is there.
    pub fn new(path: Option<PathBuf>) -> Self {
        let mut app = Self {
            path: path.as_ref().map_or(DEFAULT_MODEL.to_string(), |p| p.display().to_string()),
            source: Source::None,
            settings: Settings::default(),
            trajectory: None,
            view: ViewState { tab: Tab::Trajectory, step: 0, layer: 0, image: 0 },
            progress: None,
            status: "open a model folder or a saved trajectory".into(),
            export_path: "explorer-view.png".into(),
            hovered_patch: None,
            prompt: "The state of the Union is strong.".into(),
            text_routes: None,
            run: None,
            loaded: None,
            generation: 0,
            textures: Textures::default(),
        };
        match path {
            Some(p) => app.open(&p),
            None if ModelDir::open(Path::new(DEFAULT_MODEL)).is_ok() => app.open(Path::new(DEFAULT_MODEL)),
            None => {}
        }
        app
    }

    pub fn is_running(&self) -> bool {
        self.run.is_some()
    }

    /// Opens a saved trajectory, a language model folder or a DiT model folder (taking its
    /// sampling defaults).
    pub fn open(&mut self, path: &Path) {
        self.path = path.display().to_string();
        if let Some(text) = TextModel::open(path) {
            match text {
                Ok(t) => {
                    let c = t.model.config();
                    self.status = format!("opened language model {}: {} layers, MoE layers {:?}; route a prompt", path.display(), c.num_layers, c.moe_layers());
                    self.source = Source::Text(Box::new(t));
                    self.text_routes = None;
                    self.route_prompt();
                }
                Err(e) => self.status = format!("error: {e}"),
            }
            return;
        }
        if is_trajectory_dir(path) {
            match RoutingTrajectory::load(path) {
                Ok(t) => {
                    self.status =
                        format!("opened trajectory {} ({} images, {} evaluations)", path.display(), t.dims().images, t.dims().steps);
                    // Show how it was sampled (the settings are read-only without a model).
                    let m = &t.meta;
                    if let Ok(k) = m.sampler.parse() {
                        self.settings.sampler = k;
                    }
                    self.settings = Settings {
                        class: m.classes[0],
                        seed: m.seed,
                        steps: m.steps,
                        guidance: m.guidance,
                        guidance_interval: m.guidance_interval,
                        ..self.settings.clone()
                    };
                    self.source = Source::Trajectory(path.to_path_buf());
                    self.set_trajectory(t);
                }
                Err(e) => self.status = format!("error: {e}"),
            }
            return;
        }
        match ModelDir::open(path).and_then(|dir| Ok((RunDefaults::read(&dir.dir, None)?, dir))) {
            Ok((defaults, dir)) => {
                let c = &dir.config;
                self.status = format!(
                    "opened model {}: {} layers, {} experts (top-{}), {}x{} tokens",
                    path.display(),
                    c.depth,
                    c.num_experts,
                    c.num_experts_per_tok,
                    c.grid_size(),
                    c.grid_size()
                );
                self.settings.sampler = defaults.sampler;
                self.settings.steps = defaults.steps;
                // Models without a null class cannot be guided.
                self.settings.guidance = if c.label_table_rows() > c.num_classes { defaults.cfg_scale } else { 1.0 };
                self.settings.guidance_interval = defaults.guidance_interval;
                self.settings.class = self.settings.class.min(c.num_classes - 1);
                self.source = Source::Model(Box::new(dir));
            }
            Err(e) => self.status = format!("error: {e}"),
        }
    }

    /// Routes the prompt through the open language model.
    pub fn route_prompt(&mut self) {
        let Source::Text(t) = &self.source else {
            self.status = "error: routing a prompt needs a language model folder".into();
            return;
        };
        match TokenRoutes::of_prompt(&t.model, &t.tokenizer, &self.prompt) {
            Ok(r) => {
                self.status = format!("routed {} tokens through {} MoE layers", r.pieces.len(), r.layers.len());
                self.text_routes = Some(r);
                self.generation += 1;
            }
            Err(e) => self.status = format!("error: {e}"),
        }
    }

    fn set_trajectory(&mut self, t: RoutingTrajectory) {
        let d = t.dims();
        self.view.step = self.view.step.min(d.steps.saturating_sub(1));
        self.view.layer = self.view.layer.min(d.layers.saturating_sub(1));
        self.view.image = 0;
        self.trajectory = Some(t);
        self.generation += 1;
    }

    /// Starts a run in the background: the selected class, or one image of every class (the
    /// class comparison). `wake` repaints the UI.
    pub fn start_run(&mut self, all_classes: bool, wake: impl Fn() + Send + 'static) {
        let Source::Model(dir) = &self.source else {
            self.status = "error: runs need a model folder (a saved trajectory can only be browsed)".into();
            return;
        };
        let device = match self.settings.device {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda => match ditmoe::runtime::graph::cuda_device(0) {
                Ok(d) => d,
                Err(e) => {
                    self.status = format!("error: cuda: {e}");
                    return;
                }
            },
        };
        let s = &self.settings;
        let classes = if all_classes { (0..dir.config.num_classes).collect() } else { vec![s.class] };
        let req = RecordRequest {
            classes,
            seed: s.seed,
            sampler: s.sampler,
            steps: s.steps,
            guidance: s.guidance,
            guidance_interval: s.guidance_interval,
            batch_size: 16,
        };
        self.status = format!("sampling {} image(s), {} x {} steps…", req.classes.len(), s.sampler, s.steps);
        self.progress = None;
        self.run = Some(Run::start((**dir).clone(), self.loaded.clone(), device, s.dtype, req, wake));
    }

    fn poll_run(&mut self) {
        let Some(run) = &mut self.run else { return };
        match run.poll() {
            Poll::Running(p) => self.progress = p,
            Poll::Finished(result) => {
                self.run = None;
                self.progress = None;
                match *result {
                    Ok((t, loaded)) => {
                        self.status = format!("done: {} image(s), {} evaluations", t.dims().images, t.dims().steps);
                        self.loaded = Some(loaded);
                        self.set_trajectory(t);
                    }
                    Err(e) => self.status = format!("error: {e}"),
                }
            }
        }
    }

    /// The current view as a PNG.
    pub fn export_view(&self, path: &Path) -> Result<(), String> {
        if let (Source::Text(_), Some(r)) = (&self.source, &self.text_routes) {
            let img = r.figure().map_err(|e| e.to_string())?.render();
            return save_png(&img, path).map_err(|e| e.to_string());
        }
        let t = self.trajectory.as_ref().ok_or("nothing to export yet")?;
        let v = self.view;
        let img = match v.tab {
            Tab::Trajectory => trajectory_view(t, v.image, v.step, v.layer),
            Tab::Classes => class_view(t, v.layer),
        };
        save_png(&img, path).map_err(|e| e.to_string())
    }

    /// One frame of the whole window.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        self.poll_run();
        egui::Panel::top("source").show(ui, |ui| self.source_bar(ui));
        egui::Panel::left("settings").resizable(false).exact_size(230.0).show(ui, |ui| self.settings_panel(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::both().show(ui, |ui| self.main_view(ui));
        });
    }

    fn source_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            let label = ui.label("Model or trajectory:");
            ui.add(egui::TextEdit::singleline(&mut self.path).desired_width(320.0)).labelled_by(label.id);
            if ui.button("Open").clicked() {
                let path = PathBuf::from(self.path.trim());
                self.open(&path);
            }
            ui.separator();
            let label = ui.label("Export to:");
            ui.add(egui::TextEdit::singleline(&mut self.export_path).desired_width(180.0)).labelled_by(label.id);
            let has = self.trajectory.is_some() || self.text_routes.is_some();
            if ui.add_enabled(has, egui::Button::new("Export view PNG")).clicked() {
                let path = PathBuf::from(self.export_path.trim());
                self.status = match self.export_view(&path) {
                    Ok(()) => format!("wrote {}", path.display()),
                    Err(e) => format!("error: {e}"),
                };
            }
            if ui.add_enabled(self.trajectory.is_some(), egui::Button::new("Save trajectory")).clicked() {
                let dir = PathBuf::from(self.export_path.trim()).with_extension("");
                if let Some(t) = &self.trajectory {
                    self.status = match t.save(&dir) {
                        Ok(()) => format!("saved the trajectory to {}", dir.display()),
                        Err(e) => format!("error: {e}"),
                    };
                }
            }
        });
        ui.label(&self.status);
    }

    fn settings_panel(&mut self, ui: &mut egui::Ui) {
        if let Source::Text(_) = &self.source {
            ui.heading("Prompt");
            let label = ui.label("text");
            ui.add(egui::TextEdit::multiline(&mut self.prompt).desired_rows(4)).labelled_by(label.id);
            if ui.button("Route").clicked() {
                self.route_prompt();
            }
            return;
        }
        ui.heading("Sampling");
        let model = match &self.source {
            Source::Model(dir) => Some((**dir).clone()),
            _ => None,
        };
        ui.add_enabled_ui(model.is_some() && !self.is_running(), |ui| {
            let s = &mut self.settings;
            egui::Grid::new("settings-grid").num_columns(2).show(ui, |ui| {
                let label = ui.label("class");
                let names: Vec<String> = match &model {
                    Some(dir) => (0..dir.config.num_classes).map(|c| format!("{c}: {}", dir.class_name(c))).collect(),
                    None => vec!["0".into()],
                };
                ComboBox::from_id_salt("class")
                    .selected_text(names.get(s.class).cloned().unwrap_or_default())
                    .show_ui(ui, |ui| {
                        for (c, name) in names.iter().enumerate() {
                            ui.selectable_value(&mut s.class, c, name);
                        }
                    })
                    .response
                    .labelled_by(label.id);
                ui.end_row();
                let label = ui.label("seed");
                ui.add(DragValue::new(&mut s.seed)).labelled_by(label.id);
                ui.end_row();
                let label = ui.label("sampler");
                ComboBox::from_id_salt("sampler")
                    .selected_text(s.sampler.name())
                    .show_ui(ui, |ui| {
                        for k in SamplerKind::ALL {
                            ui.selectable_value(&mut s.sampler, k, k.name());
                        }
                    })
                    .response
                    .labelled_by(label.id);
                ui.end_row();
                let label = ui.label("steps");
                ui.add(DragValue::new(&mut s.steps).range(1..=1000)).labelled_by(label.id);
                ui.end_row();
                let label = ui.label("guidance");
                ui.horizontal(|ui| {
                    ui.add(DragValue::new(&mut s.guidance).range(0.0..=20.0).speed(0.05)).labelled_by(label.id);
                    if let Some(i) = s.guidance_interval {
                        ui.label(format!("at levels {i}")).on_hover_text("guidance applies at these noise levels only (1 = pure noise)");
                    }
                });
                ui.end_row();
                let label = ui.label("device");
                ComboBox::from_id_salt("device")
                    .selected_text(format!("{:?}", s.device).to_lowercase())
                    .show_ui(ui, |ui| {
                        ui.selectable_value(&mut s.device, DeviceChoice::Cpu, "cpu");
                        if candle_core::utils::cuda_is_available() {
                            ui.selectable_value(&mut s.device, DeviceChoice::Cuda, "cuda");
                        }
                    })
                    .response
                    .labelled_by(label.id);
                ui.end_row();
                let label = ui.label("weights");
                ComboBox::from_id_salt("dtype")
                    .selected_text(format!("{:?}", s.dtype).to_lowercase())
                    .show_ui(ui, |ui| {
                        for d in [DType::F32, DType::BF16, DType::F16] {
                            ui.selectable_value(&mut s.dtype, d, format!("{d:?}").to_lowercase());
                        }
                    })
                    .response
                    .labelled_by(label.id);
                ui.end_row();
            });
            ui.add_space(6.0);
            let wake = {
                let ctx = ui.ctx().clone();
                move || ctx.request_repaint()
            };
            if ui.button("Run").clicked() {
                self.start_run(false, wake.clone());
            }
            if ui.button("Run all classes").on_hover_text("one image of every class, for the class comparison").clicked() {
                self.start_run(true, wake);
            }
        });
        if self.is_running() {
            let (done, total) = self.progress.map_or((0, 0), |p| (p.done, p.total));
            let frac = if total > 0 { done as f32 / total as f32 } else { 0.0 };
            ui.add(egui::ProgressBar::new(frac).text(format!("{done}/{total} evaluations")));
        }
        if let Some(t) = &self.trajectory {
            ui.separator();
            ui.heading("Trajectory");
            let m = &t.meta;
            ui.label(format!("{} x {} steps, {}, seed {}", m.sampler, m.steps, m.guidance_label(), m.seed));
            let d = t.dims();
            ui.label(format!("{} image(s), {} layers, {} experts top-{}", d.images, d.layers, d.experts, d.top_k));
        }
    }

    fn main_view(&mut self, ui: &mut egui::Ui) {
        if let Source::Text(_) = &self.source {
            self.text_view(ui);
            return;
        }
        let Some(t) = &self.trajectory else {
            ui.label("No trajectory yet: open a model and press Run, or open a saved trajectory.");
            return;
        };
        let d = t.dims();
        let timesteps = t.meta.timesteps.clone();
        let image_names: Vec<String> = (0..d.images).map(|n| format!("{n}: {}", t.meta.class_name(t.meta.classes[n]))).collect();
        ui.horizontal(|ui| {
            ui.selectable_value(&mut self.view.tab, Tab::Trajectory, "Trajectory");
            ui.selectable_value(&mut self.view.tab, Tab::Classes, "Class comparison");
        });
        ui.horizontal(|ui| {
            let label = ui.label("timestep");
            ui.add(Slider::new(&mut self.view.step, 0..=d.steps - 1).custom_formatter(|v, _| {
                format!("{} (t = {})", v as usize + 1, timestep_label(timesteps[(v as usize).min(timesteps.len() - 1)]))
            }))
            .labelled_by(label.id);
            let label = ui.label("layer");
            ui.add(Slider::new(&mut self.view.layer, 0..=d.layers - 1)).labelled_by(label.id);
            if d.images > 1 {
                let label = ui.label("image");
                ComboBox::from_id_salt("image")
                    .selected_text(image_names[self.view.image].clone())
                    .show_ui(ui, |ui| {
                        for (n, name) in image_names.iter().enumerate() {
                            ui.selectable_value(&mut self.view.image, n, name);
                        }
                    })
                    .response
                    .labelled_by(label.id);
            }
        });
        ui.separator();
        match self.view.tab {
            Tab::Trajectory => self.trajectory_tab(ui),
            Tab::Classes => self.classes_tab(ui),
        }
    }

    fn trajectory_tab(&mut self, ui: &mut egui::Ui) {
        let Some(t) = &self.trajectory else { return };
        let v = self.view;
        let g = self.generation;
        let ctx = ui.ctx().clone();
        let side = PICTURE_SIDE as f32;
        let state = self.textures.get(&ctx, "state", (g, v.image, v.step, 0), || state_view(t, v.image, v.step));
        let sample = self.textures.get(&ctx, "sample", (g, v.image, 0, 0), || sample_view(t, v.image));
        let load = self.textures.get(&ctx, "load", (g, v.layer, v.step, 0), || step_figure(t, v.layer, Some(v.step)).render());
        ui.horizontal(|ui| {
            ui.vertical(|ui| {
                ui.label(format!("x_t at t = {}", timestep_label(t.meta.timesteps[v.step])));
                ui.add(egui::Image::from_texture(egui::load::SizedTexture::new(state.id(), [side, side])));
            });
            ui.vertical(|ui| {
                ui.label(format!("first-choice expert per patch, layer {}", v.layer));
                self.hovered_patch = patch_map(ui, t, v, side);
            });
            ui.vertical(|ui| {
                ui.label("final sample");
                ui.add(egui::Image::from_texture(egui::load::SizedTexture::new(sample.id(), [side, side])));
            });
        });
        expert_legend(ui, t.dims().experts);
        ui.add_space(8.0);
        ui.label(format!("expert load over the run, layer {} (current step outlined)", v.layer));
        let size = load.size_vec2();
        ui.add(egui::Image::from_texture(egui::load::SizedTexture::new(load.id(), size)));
    }

    /// The language model's routing of the prompt: each token's first-choice expert per MoE
    /// layer (hover a column for every layer's choices), and each layer's expert load.
    fn text_view(&mut self, ui: &mut egui::Ui) {
        let Some(r) = &self.text_routes else {
            ui.label("Type a prompt and press Route.");
            return;
        };
        let g = self.generation;
        let ctx = ui.ctx().clone();
        let map = self.textures.get(&ctx, "text-routes", (g, 0, 0, 0), || r.figure().map(|f| f.render()).unwrap_or_default());
        let load = self.textures.get(&ctx, "text-load", (g, 0, 0, 0), || r.load_figure().map(|f| f.render()).unwrap_or_default());
        ui.label("first-choice expert of each token, per MoE layer");
        let response = ui.add(egui::Image::from_texture(egui::load::SizedTexture::new(map.id(), map.size_vec2())).sense(Sense::hover()));
        response.on_hover_ui(|ui| {
            for (t, piece) in r.pieces.iter().enumerate() {
                let picks: Vec<String> = r.layers.iter().zip(&r.choices).map(|(l, c)| format!("L{l}: {:?}", c[t])).collect();
                ui.label(format!("`{piece}`  {}", picks.join("  ")));
            }
        });
        ui.add_space(8.0);
        ui.label("expert load over the prompt");
        ui.add(egui::Image::from_texture(egui::load::SizedTexture::new(load.id(), load.size_vec2())));
    }

    fn classes_tab(&mut self, ui: &mut egui::Ui) {
        let Some(t) = &self.trajectory else { return };
        if t.classes().len() < 2 {
            ui.label("This trajectory has one class: press \"Run all classes\" to compare classes.");
            return;
        }
        let v = self.view;
        let ctx = ui.ctx().clone();
        let tex = self.textures.get(&ctx, "classes", (self.generation, v.layer, 0, 0), || class_view(t, v.layer));
        let size = tex.size_vec2();
        ui.add(egui::Image::from_texture(egui::load::SizedTexture::new(tex.id(), size)));
    }
}

/// The patch grid coloured by each token's first-choice expert; hovering a patch shows its
/// experts and weights in every layer at this step. Returns the hovered patch.
fn patch_map(ui: &mut egui::Ui, t: &RoutingTrajectory, v: ViewState, side: f32) -> Option<usize> {
    let d = t.dims();
    let (response, painter) = ui.allocate_painter(egui::vec2(side, side), Sense::hover());
    let rect = response.rect;
    let cell = side / d.grid as f32;
    let choices = first_choice(t, v.image, v.step, v.layer);
    let hovered = response.hover_pos().map(|p| {
        let col = (((p.x - rect.min.x) / cell) as usize).min(d.grid - 1);
        let row = (((p.y - rect.min.y) / cell) as usize).min(d.grid - 1);
        row * d.grid + col
    });
    for (tok, &e) in choices.iter().enumerate() {
        let min = rect.min + egui::vec2((tok % d.grid) as f32 * cell, (tok / d.grid) as f32 * cell);
        let r = egui::Rect::from_min_size(min, egui::vec2(cell, cell));
        let [red, green, blue] = expert_color(e);
        painter.rect_filled(r, 0.0, Color32::from_rgb(red, green, blue));
        painter.rect_stroke(r, 0.0, Stroke::new(0.5, Color32::from_black_alpha(90)), StrokeKind::Inside);
    }
    if let Some(tok) = hovered {
        let min = rect.min + egui::vec2((tok % d.grid) as f32 * cell, (tok / d.grid) as f32 * cell);
        painter.rect_stroke(
            egui::Rect::from_min_size(min, egui::vec2(cell, cell)),
            0.0,
            Stroke::new(2.0, Color32::WHITE),
            StrokeKind::Inside,
        );
        response.on_hover_ui_at_pointer(|ui| {
            ui.label(format!("patch {tok} (row {}, column {})", tok / d.grid, tok % d.grid));
            for l in 0..d.layers {
                let experts = t.token_experts(v.image, v.step, l, tok);
                let weights = t.token_weights(v.image, v.step, l, tok);
                let picks: Vec<String> = experts.iter().zip(weights).map(|(e, w)| format!("E{e} {w:.2}")).collect();
                ui.label(format!("layer {l}: {}", picks.join(", ")));
            }
        });
    }
    hovered
}

fn expert_legend(ui: &mut egui::Ui, experts: usize) {
    ui.horizontal_wrapped(|ui| {
        for e in 0..experts {
            let (r, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), Sense::hover());
            let [red, green, blue] = expert_color(e);
            ui.painter().rect_filled(r, 2.0, Color32::from_rgb(red, green, blue));
            ui.label(format!("E{e}"));
        }
    });
}
