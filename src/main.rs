//! `ditmoe`: generate images, train, inspect and convert DiT-MoE models.
mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ditmoe", version, about = "DiT-MoE mixture-of-experts diffusion transformers on candle")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample class-conditional images (DDPM, DDIM or rectified flow) into a PNG grid or files.
    Generate(cli::generate::GenerateArgs),
    /// Run one forward pass of a model folder on an inputs file (parity with the official code).
    Forward(cli::forward::ForwardArgs),
    /// Record expert routing along sampling runs: heatmaps by timestep, patch and class.
    Routes(cli::routes::RoutesArgs),
    /// List the official sizes with their total and activated parameter counts.
    Presets,
    /// Convert an official checkpoint (.pt/.pth/.safetensors) into a model folder.
    Convert(cli::convert::ConvertArgs),
    /// Train a model on class folders or latent shards (exact resume with --resume).
    Train(cli::train::TrainArgs),
    /// Pre-encode class folders into SD-VAE latent shards for latent models.
    Encode(cli::encode::EncodeArgs),
    /// Convert a downloaded dataset into class folders (`data fashion-mnist`).
    Data(cli::data::DataArgs),
    /// Score a Fashion-MNIST model's samples with a classifier (accuracy, Fréchet distance).
    Eval(cli::eval::EvalArgs),
    /// The language model: forward, train, generate, eval (`ditmoe lm --help`).
    Lm(cli::lm::LmArgs),
    /// Start one process per GPU on this host with torchrun's variables: `launch --nproc-per-node N -- <command>`.
    Launch(cli::launch::LaunchArgs),
    /// Check a distributed job's processes: `dist check` joins the rendezvous and runs every collective.
    Dist(cli::launch::DistArgs),
}

fn main() {
    let args = Args::parse();
    let result = match args.command {
        Command::Generate(a) => cli::generate::run(a),
        Command::Forward(a) => cli::forward::run(a),
        Command::Routes(a) => cli::routes::run(a),
        Command::Presets => cli::presets::run(),
        Command::Convert(a) => cli::convert::run(a),
        Command::Train(a) => cli::train::run(a),
        Command::Encode(a) => cli::encode::run(a),
        Command::Data(a) => cli::data::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Lm(a) => cli::lm::run(a),
        Command::Launch(a) => cli::launch::run(a),
        Command::Dist(a) => cli::launch::run_dist(a),
    };
    if let Err(e) = result {
        cli::exit_with(e);
    }
}
