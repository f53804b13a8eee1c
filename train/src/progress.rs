//! A Burn metrics renderer that draws one indicatif bar per training run (the epoch's
//! iterations, with the epoch number), instead of the TUI or a line per iteration. The
//! per-epoch metrics are printed from Burn's logs when the run ends.

use burn::train::renderer::{EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation, MetricsRendererTraining, ProgressType, TrainingProgress};
use burn::train::metric::MetricDefinition;
use burn::train::LearnerSummary;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct BarRenderer {
    bar: ProgressBar,
    label: String,
    /// The epoch last shown, to log one line per epoch (the bar is hidden in logs).
    epoch: usize,
    start: std::time::Instant,
}

impl BarRenderer {
    pub fn new(label: String, visible: bool) -> Self {
        let bar = if visible { ProgressBar::new(0) } else { ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden()) };
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}").expect("valid template"),
        );
        bar.set_prefix(label.clone());
        Self { bar, label, epoch: 0, start: std::time::Instant::now() }
    }

    fn show(&mut self, item: &TrainingProgress, phase: &str) {
        if let Some(p) = &item.progress {
            self.bar.set_length(p.items_total as u64);
            self.bar.set_position(p.items_processed as u64);
        }
        let g = &item.global_progress;
        if g.items_processed != self.epoch {
            self.epoch = g.items_processed;
            tracing::info!("{}: epoch {}/{} ({:.1} s)", self.label, g.items_processed, g.items_total, self.start.elapsed().as_secs_f64());
        }
        self.bar.set_message(format!("epoch {}/{} {phase}", g.items_processed, g.items_total));
    }
}

impl MetricsRendererTraining for BarRenderer {
    fn update_train(&mut self, _state: MetricState) {}

    fn update_valid(&mut self, _state: MetricState) {}

    fn render_train(&mut self, item: TrainingProgress, _progress_indicators: Vec<ProgressType>) {
        self.show(&item, "train");
    }

    fn render_valid(&mut self, item: TrainingProgress, _progress_indicators: Vec<ProgressType>) {
        self.show(&item, "valid");
    }

    fn on_train_end(&mut self, _summary: Option<LearnerSummary>) -> Result<(), Box<dyn core::error::Error>> {
        self.bar.finish_and_clear();
        tracing::debug!("{}: training ended", self.label);
        Ok(())
    }
}

impl MetricsRendererEvaluation for BarRenderer {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}

    fn render_test(&mut self, _item: EvaluationProgress, _progress_indicators: Vec<ProgressType>) {}
}

impl MetricsRenderer for BarRenderer {
    fn manual_close(&mut self) {
        self.bar.finish_and_clear();
    }

    fn register_metric(&mut self, _definition: MetricDefinition) {}
}
