//! `Matrix`: a dense row-major table of f64, the one shape every aggregation returns
//! (rows = timesteps, patches or classes; columns = experts), so heatmaps, JSON and CSV all
//! read the same thing.
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols` values, row after row.
    pub data: Vec<f64>,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self { rows, cols, data: vec![0.0; rows * cols] }
    }

    pub fn from_rows(rows: &[Vec<f64>]) -> Result<Self> {
        let cols = rows.first().map_or(0, Vec::len);
        if let Some(r) = rows.iter().find(|r| r.len() != cols) {
            bail!("matrix rows of different lengths ({} and {cols})", r.len())
        }
        Ok(Self { rows: rows.len(), cols, data: rows.concat() })
    }

    pub fn get(&self, r: usize, c: usize) -> f64 {
        self.data[r * self.cols + c]
    }

    pub fn add(&mut self, r: usize, c: usize, v: f64) {
        self.data[r * self.cols + c] += v;
    }

    pub fn row(&self, r: usize) -> &[f64] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Rows as nested vectors (the JSON layout people load with `np.array`).
    pub fn to_rows(&self) -> Vec<Vec<f64>> {
        (0..self.rows).map(|r| self.row(r).to_vec()).collect()
    }

    /// Each row divided by its sum (an all-zero row stays zero): counts become the fraction
    /// of a row's selections each column got.
    pub fn row_normalized(&self) -> Self {
        let mut m = self.clone();
        for r in 0..self.rows {
            let sum: f64 = self.row(r).iter().sum();
            if sum > 0.0 {
                m.data[r * self.cols..(r + 1) * self.cols].iter_mut().for_each(|v| *v /= sum);
            }
        }
        m
    }

    /// Column of the largest value of each row; ties go to the lowest column, so an
    /// all-equal row reads as column 0 rather than as an arbitrary pick.
    pub fn argmax_rows(&self) -> Vec<usize> {
        (0..self.rows)
            .map(|r| self.row(r).iter().enumerate().fold((0, f64::NEG_INFINITY), |best, (c, &v)| if v > best.1 { (c, v) } else { best }).0)
            .collect()
    }

    /// (min, max) of all values; (0, 0) for an empty matrix.
    pub fn range(&self) -> (f64, f64) {
        if self.data.is_empty() {
            return (0.0, 0.0);
        }
        self.data.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
    }

    /// Rows become columns (e.g. steps x experts -> experts x steps, time along x).
    pub fn transposed(&self) -> Self {
        let mut m = Self::zeros(self.cols, self.rows);
        for r in 0..self.rows {
            for c in 0..self.cols {
                m.data[c * self.rows + r] = self.get(r, c);
            }
        }
        m
    }
}
