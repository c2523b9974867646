//! The run's report: SOAK.md (every check with its value and whether a
//! zero is required, the settings, the faults injected, the latencies) and
//! the latency-over-time picture beside it (SVG, with the faults marked).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::checks::Check;
use crate::faults::Injected;
use crate::latency::{self, Sample};
use crate::setup::Env;

/// Everything the report shows.
pub struct Report<'a> {
    pub env: &'a Env,
    pub checks: &'a [Check],
    pub faults: &'a [Injected],
    pub samples: &'a [Sample],
    pub notes: &'a [String],
    pub load_secs: f64,
    pub total_secs: f64,
}

impl Report<'_> {
    pub fn markdown(&self, svg_name: &str) -> String {
        let mut o = String::new();
        self.summary(&mut o);
        self.latency(&mut o, svg_name);
        self.faults_table(&mut o);
        self.setup(&mut o);
        o
    }

    /// The title, what ran, and the checks with their verdict.
    fn summary(&self, o: &mut String) {
        let e = self.env;
        let _ = writeln!(*o, "# Soak run\n");
        let _ = writeln!(
            *o,
            "`make soak` (scripts/soak.sh, examples/soak/): seed {}, {:.1} minutes of load \
             ({:.1} minutes in all), {} identities, {} actions/s asked, {}.\n",
            e.seed,
            self.load_secs / 60.0,
            self.total_secs / 60.0,
            e.identities,
            e.rate,
            if e.quick { "quick mode" } else { "full mode" }
        );
        let failed = self.checks.iter().filter(|c| c.failed()).count();
        let _ = writeln!(
            *o,
            "**{}**\n",
            if failed == 0 {
                "Every required zero is zero.".to_string()
            } else {
                format!("{failed} required zero(s) not zero.")
            }
        );
        let _ = writeln!(*o, "| check | value | zero required | |\n|---|---|---|---|");
        for c in self.checks {
            let _ = writeln!(
                *o,
                "| {} | {} | {} | {} |",
                c.name,
                c.text.clone().unwrap_or_else(|| c.value.to_string()),
                if c.zero_required { "yes" } else { "no" },
                if c.failed() { "FAIL" } else { "" }
            );
        }
    }

    /// Latency, APPEND to hand-off: overall and per minute with the faults.
    fn latency(&self, o: &mut String, svg_name: &str) {
        let _ = writeln!(*o, "\n## Latency, APPEND to hand-off\n");
        let _ = writeln!(
            *o,
            "- IDLE (INBOX of identities with `idle`): {}",
            latency::fmt(latency::stats(self.samples, true))
        );
        let _ = writeln!(
            *o,
            "- polled (every other synced folder): {}",
            latency::fmt(latency::stats(self.samples, false))
        );
        let _ = writeln!(*o, "\n![latency over time]({svg_name})\n");
        let _ = writeln!(
            *o,
            "| minute (of the APPEND) | IDLE p50 / max, s (messages) | polled p50 / max, s (messages) | faults starting |\n|---|---|---|---|"
        );
        for (m, idle, polled) in latency::per_minute(self.samples) {
            let starting: Vec<String> = self
                .faults
                .iter()
                .filter(|f| (f.start / 60.0) as usize == m)
                .map(|f| f.kind.label())
                .collect();
            let _ = writeln!(
                *o,
                "| {m} | {} | {} | {} |",
                latency::brief(&idle),
                latency::brief(&polled),
                starting.join(", ")
            );
        }
    }

    /// Every fault injected, when and for how long.
    fn faults_table(&self, o: &mut String) {
        let _ = writeln!(*o);
        let _ = writeln!(
            *o,
            "## Faults injected\n\n| at (s) | fault | lasted (s) | note |\n|---|---|---|---|"
        );
        for f in self.faults {
            let _ = writeln!(
                *o,
                "| {:.0} | {} | {:.0} | {} |",
                f.start,
                f.kind.label(),
                f.end - f.start,
                f.note.replace('|', "/").replace('\n', " ")
            );
        }
    }

    /// How the run was set up, and its notes.
    fn setup(&self, o: &mut String) {
        let e = self.env;
        let _ = writeln!(*o, "\n## Set-up\n");
        let _ = writeln!(
            *o,
            "2 pollers (leader and standby), 3 workers (the third with `idle_max: 5`), \
             `lock_ttl_secs: 30`, `raw_size_limit: {}` (larger messages go to S3); identities \
             polled every minute, 3 to 5 folders each (one may be `Été 2026`), a third with \
             `mailboxes: *`, a third listing every folder, a third all but one; every other one \
             with `idle: true`. The processor is a stand-in (`tests/support/processor.rs`). \
             Daemon logs: `{}`.\n",
            e.raw_size_limit,
            e.launch.work.display()
        );
        for n in self.notes {
            let _ = writeln!(*o, "- {n}");
        }
    }

    /// Latency of each message over the run, IDLE and polled, with each
    /// fault's window shaded.
    pub fn svg(&self, path: &Path) -> Result<()> {
        let root = SVGBackend::new(path, (1100, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
        let xmax = (self.load_secs / 60.0).max(0.5) * 1.05;
        let ymax = self.samples.iter().map(|s| s.secs).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "APPEND to hand-off (s) over the run (min); faults shaded",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..xmax, 0.0..ymax)
            .map_err(|e| anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .x_desc("minutes since the load started")
            .y_desc("seconds")
            .draw()
            .map_err(|e| anyhow!("{e:?}"))?;
        let shade = RGBColor(255, 200, 120).mix(0.35);
        for f in self.faults {
            let (a, b) = (f.start / 60.0, (f.end / 60.0).max(f.start / 60.0 + 0.05));
            chart
                .draw_series([Rectangle::new([(a, 0.0), (b, ymax)], shade.filled())])
                .map_err(|e| anyhow!("{e:?}"))?;
            chart
                .draw_series([Text::new(
                    f.kind.label(),
                    (a, ymax * 0.97),
                    ("sans-serif", 10),
                )])
                .map_err(|e| anyhow!("{e:?}"))?;
        }
        for (idle, color, name) in [(false, BLUE, "polled"), (true, RED, "IDLE")] {
            chart
                .draw_series(
                    self.samples
                        .iter()
                        .filter(|s| s.idle == idle)
                        .map(|s| Circle::new((s.at_min, s.secs), 2, color.filled())),
                )
                .map_err(|e| anyhow!("{e:?}"))?
                .label(name)
                .legend(move |(x, y)| Circle::new((x, y), 3, color.filled()));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(|e| anyhow!("{e:?}"))?;
        root.present().map_err(|e| anyhow!("{e:?}"))?;
        Ok(())
    }
}
