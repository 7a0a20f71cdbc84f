//! `ditmoe eval --sweep`: the reports of a grid of guidance scales × step counts for one model
//! and sampler, as a markdown table and as the lines of the trade-off chart
//! ([`crate::analysis::tradeoff`]).
use super::report::EvalReport;
use crate::analysis::tradeoff::{TradeoffPoint, TradeoffSeries};
use std::fmt::Write;

/// The table, one row per report in the given order, with a closing line giving the real-vs-real
/// floor (the same for every row: one real split, one subset draw, one sample size).
pub fn markdown_table(reports: &[EvalReport]) -> String {
    let mut s = String::from(
        "| sampler | steps | cfg | accuracy | FD (whole split) | FD (subset) | FD ratio | precision | recall | sampling s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in reports {
        let o = &r.samples;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} % | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {:.0} |",
            o.sampler.name(),
            o.steps,
            o.cfg_scale,
            100.0 * r.generated_accuracy,
            r.frechet_distance,
            r.frechet_distance_subset,
            r.frechet_ratio,
            r.precision_recall.precision,
            r.precision_recall.recall,
            r.sampling_seconds,
        );
    }
    if let Some(r) = reports.first() {
        let n: usize = r.real_subsets.per_class.iter().sum();
        let _ = writeln!(
            s,
            "\nReal vs real ({n} + {n} disjoint real images, subset seed {}): FD {:.2}, precision {:.3}, recall {:.3} (k = {}).",
            r.real_subsets.seed,
            r.frechet_distance_real,
            r.precision_recall_real.precision,
            r.precision_recall_real.recall,
            r.precision_recall_real.k,
        );
    }
    s
}

/// One series per step count (in order of first appearance), its points in the reports' order.
pub fn tradeoff_series(reports: &[EvalReport]) -> Vec<TradeoffSeries> {
    let mut series: Vec<(usize, TradeoffSeries)> = Vec::new();
    for r in reports {
        let steps = r.samples.steps;
        let point = TradeoffPoint {
            cfg_scale: r.samples.cfg_scale,
            accuracy: r.generated_accuracy,
            frechet_ratio: r.frechet_ratio,
            precision: r.precision_recall.precision,
            recall: r.precision_recall.recall,
        };
        match series.iter_mut().find(|(s, _)| *s == steps) {
            Some((_, line)) => line.points.push(point),
            None => series.push((steps, TradeoffSeries { label: format!("{steps} steps"), points: vec![point] })),
        }
    }
    series.into_iter().map(|(_, s)| s).collect()
}
