//! The fit report: a per-layer table on stdout and a PNG plot (recall and density per
//! layer, true against predicted) drawn with plotters.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::dataset::PredictorKind;
use crate::error::TrainError;
use crate::fit::{FitReport, TrainedPredictor};

/// The table: one line per trained predictor, `*` marking the rank chosen for the folder.
pub fn table(report: &FitReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<9} {:>5} {:>5} {:>7} {:>8} {:>9} {:>9} {:>9} {:>6} {:>9} {:>6} {:>7}\n",
        "predictor", "layer", "rank", "epochs", "true", "thr dens", "thr rec", "dens/true", "K", "recall@K", "K/n", "run s"
    ));
    let mut rows: Vec<&TrainedPredictor> = report.trained.iter().collect();
    rows.sort_by_key(|t| (t.kind, t.layer, t.rank));
    for t in rows {
        let c = &t.calibration;
        let chosen = report.chosen.contains(&(t.kind, t.layer, t.rank));
        out.push_str(&format!(
            "{:<9} {:>5} {:>4}{} {:>7} {:>8.4} {:>9.4} {:>9.4} {:>9.2} {:>6} {:>9.4} {:>6.3} {:>7.1}\n",
            t.kind.name(),
            t.layer,
            t.rank,
            if chosen { "*" } else { " " },
            format!("{}/{}", t.best_epoch, t.epochs.len()),
            c.true_density,
            c.density_at_threshold,
            c.recall_at_threshold,
            c.density_at_threshold / c.true_density.max(f64::MIN_POSITIVE),
            c.k,
            c.recall_at_k,
            c.density_at_k,
            t.seconds
        ));
    }
    out
}

const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers a system TrueType font with plotters (it draws text with ab_glyph and ships
/// no font). `DEJAVU_FONT` names one explicitly.
fn register_font() -> Result<(), TrainError> {
    let candidates: Vec<PathBuf> = std::env::var_os("DEJAVU_FONT").map(PathBuf::from).into_iter().chain(FONT_CANDIDATES.iter().map(PathBuf::from)).collect();
    let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
        TrainError::Other(format!("no TrueType font for the plot (looked at {candidates:?}); set DEJAVU_FONT or install fonts-dejavu-core"))
    })?;
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io { path: path.clone(), source })?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| TrainError::Other(format!("{} is not a usable TrueType font", path.display())))
}

type Chart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>>;
type Line<'a> = (&'a str, RGBColor, Box<dyn Fn(&TrainedPredictor) -> f64>);

/// Draws one labelled line per entry of `lines` (points per layer from `series`), with
/// markers if asked, and the legend.
fn draw_lines<'a>(chart: &mut Chart<'a, 'a>, lines: &[Line<'_>], series: &dyn Fn(&dyn Fn(&TrainedPredictor) -> f64) -> Vec<(f64, f64)>, markers: bool) -> Result<(), String> {
    for (name, color, f) in lines.iter() {
        let color = *color;
        let points = series(f.as_ref());
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        if markers {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| e.to_string())?;
        }
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 14)).draw().map_err(|e| e.to_string())
}

/// Draws the chosen predictors' recall and density per layer into `path` (PNG).
pub fn plot(report: &FitReport, path: &Path) -> Result<(), TrainError> {
    register_font()?;
    let draw_error = |e: String| TrainError::Other(format!("drawing {}: {e}", path.display()));
    let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_error(e.to_string()))?;
    let panels = root.split_evenly((2, 2));
    for (col, kind) in [PredictorKind::Mlp, PredictorKind::Attention].into_iter().enumerate() {
        let mut chosen: Vec<&TrainedPredictor> = report
            .trained
            .iter()
            .filter(|t| t.kind == kind && report.chosen.contains(&(t.kind, t.layer, t.rank)))
            .collect();
        chosen.sort_by_key(|t| t.layer);
        if chosen.is_empty() {
            continue;
        }
        let first = chosen[0].layer as f64 - 0.5;
        let last = chosen[chosen.len() - 1].layer as f64 + 0.5;
        let series = |f: &dyn Fn(&TrainedPredictor) -> f64| chosen.iter().map(|t| (t.layer as f64, f(t))).collect::<Vec<_>>();

        let max_density = chosen.iter().map(|t| t.calibration.density_at_threshold.max(t.calibration.density_at_k)).fold(0.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&panels[col])
            .caption(format!("{} predictors: density per layer", kind.name()), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(first..last, 0.0..max_density.max(1e-3))
            .map_err(|e| draw_error(e.to_string()))?;
        chart.configure_mesh().x_labels(chosen.len() + 2).x_label_formatter(&|x| format!("{x:.0}")).x_desc("layer").y_desc("fraction of outputs").label_style(("sans-serif", 14)).draw().map_err(|e| draw_error(e.to_string()))?;
        let lines: [Line<'_>; 3] = [
            ("true density", BLACK, Box::new(|t| t.calibration.true_density)),
            ("predicted, logit ≥ threshold", BLUE, Box::new(|t| t.calibration.density_at_threshold)),
            ("predicted, top-K", RED, Box::new(|t| t.calibration.density_at_k)),
        ];
        draw_lines(&mut chart, &lines, &series, true).map_err(draw_error)?;

        let low = chosen.iter().map(|t| t.calibration.recall_at_threshold.min(t.calibration.recall_at_k)).fold(1.0, f64::min);
        let mut chart = ChartBuilder::on(&panels[2 + col])
            .caption(format!("{} predictors: validation recall per layer", kind.name()), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(first..last, (low - 0.01).min(0.95)..1.0005)
            .map_err(|e| draw_error(e.to_string()))?;
        chart.configure_mesh().x_labels(chosen.len() + 2).x_label_formatter(&|x| format!("{x:.0}")).x_desc("layer").y_desc("recall").label_style(("sans-serif", 14)).draw().map_err(|e| draw_error(e.to_string()))?;
        let lines: [Line<'_>; 2] = [
            ("logit ≥ threshold", BLUE, Box::new(|t| t.calibration.recall_at_threshold)),
            ("top-K", RED, Box::new(|t| t.calibration.recall_at_k)),
        ];
        draw_lines(&mut chart, &lines, &series, false).map_err(draw_error)?;
    }
    root.present().map_err(|e| draw_error(e.to_string()))?;
    Ok(())
}
