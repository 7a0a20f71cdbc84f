//! `explorer [MODEL_OR_TRAJECTORY_DIR]`: the routing explorer in a native window (OpenGL).
use eframe::egui;
use explorer::ExplorerApp;
use std::path::PathBuf;

struct Window(ExplorerApp);

impl eframe::App for Window {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.0.show(ui);
    }
}

fn main() -> eframe::Result {
    let path = std::env::args_os().nth(1).map(PathBuf::from);
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_inner_size([1280.0, 860.0]).with_title("DiT-MoE routing explorer"),
        renderer: eframe::Renderer::Glow,
        ..Default::default()
    };
    eframe::run_native("ditmoe-explorer", options, Box::new(|_cc| Ok(Box::new(Window(ExplorerApp::new(path))))))
}
