//! `ditmoe eval --sweep`: the reports of a grid of guidance scales × step counts × guidance
//! intervals for one model and sampler, as a markdown table and as the lines of the trade-off
//! chart ([`crate::analysis::tradeoff`]).
use super::report::EvalReport;
use crate::analysis::tradeoff::{TradeoffPoint, TradeoffSeries};
use crate::sampling::GuidanceInterval;
use std::fmt::Write;

/// The noise levels a report was guided at: its interval, `[0, 1]` for every level.
fn levels(interval: Option<GuidanceInterval>) -> String {
    interval.map_or_else(|| "[0, 1]".to_string(), |i| i.to_string())
}

/// The table, one row per report in the given order, with a closing line giving the real-vs-real
/// floor (the same for every row: one real split, one subset draw, one sample size).
pub fn markdown_table(reports: &[EvalReport]) -> String {
    let mut s = String::from(
        "| sampler | steps | cfg | guidance interval | accuracy | FD (whole split) | FD (subset) | FD ratio | precision | recall | sampling s |\n\
         |---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in reports {
        let o = &r.samples;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} % | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {:.0} |",
            o.sampler.name(),
            o.steps,
            o.cfg_scale,
            levels(o.guidance_interval),
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

/// One series per step count (in order of first appearance), its points in the reports' order;
/// where the reports have more than one guidance interval, one per step count and interval,
/// labelled with both.
pub fn tradeoff_series(reports: &[EvalReport]) -> Vec<TradeoffSeries> {
    let first_interval = reports.first().map(|r| r.samples.guidance_interval);
    let several_intervals = reports.iter().any(|r| Some(r.samples.guidance_interval) != first_interval);
    let mut series: Vec<((usize, Option<GuidanceInterval>), TradeoffSeries)> = Vec::new();
    for r in reports {
        let key = (r.samples.steps, r.samples.guidance_interval);
        let point = TradeoffPoint {
            cfg_scale: r.samples.cfg_scale,
            accuracy: r.generated_accuracy,
            frechet_ratio: r.frechet_ratio,
            precision: r.precision_recall.precision,
            recall: r.precision_recall.recall,
        };
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, line)) => line.points.push(point),
            None => {
                let label = if several_intervals {
                    format!("{} steps, guidance at {}", key.0, levels(key.1))
                } else {
                    format!("{} steps", key.0)
                };
                series.push((key, TradeoffSeries { label, points: vec![point] }));
            }
        }
    }
    series.into_iter().map(|(_, s)| s).collect()
}
