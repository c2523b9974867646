//! The pictures of a run, drawn with plotters from the same rows as the
//! tables (as the soak draws its latency, `examples/soak/report.rs`):
//! initial-sync msg/s against the ceilings and mbsync per mailbox and core
//! layout, the IDLE latency distribution, worker RSS against mailbox size,
//! and the 200-folder resync against mbsync. SVG only. A new picture is
//! one function here and one line in [`draw`].

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use crate::report::{median, ms, msgs_s, num, rss, Data, Fig};

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
/// A figure's median, min and max over rounds.
type Spread = (f64, f64, f64);
/// (name, colour, points) of one line of a picture.
type Line<P> = (&'static str, RGBColor, Vec<P>);

fn pe<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("{e:?}")
}

/// Median, min and max of a figure, or None without rows.
fn spread(d: &Data, scenario: &str, mailbox: &str, f: Fig) -> Option<Spread> {
    let v = d.values(scenario, mailbox, f);
    let m = median(&v)?;
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((m, lo, hi))
}

/// Draws every picture the rows allow into `dir`; returns (title, link)
/// of each, the link being `prefix` + the file name.
pub fn draw(
    d: &Data,
    mailboxes: &[String],
    dir: &Path,
    prefix: &str,
) -> Result<Vec<(String, String)>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    let mut add = |title: &str, file: &str, drawn: Result<bool>| -> Result<()> {
        if drawn? {
            out.push((title.to_string(), format!("{prefix}{file}")));
        }
        Ok(())
    };
    let p = |f: &str| dir.join(f);
    add(
        "Initial sync, msg/s against the ceilings and mbsync",
        "initial-sync.svg",
        initial_sync(d, mailboxes, &p("initial-sync.svg")),
    )?;
    add(
        "APPEND to process_raw latency, IDLE and on demand",
        "idle-latency.svg",
        latency(d, &p("idle-latency.svg")),
    )?;
    add(
        "Worker peak RSS against mailbox size",
        "worker-rss.svg",
        worker_rss(d, mailboxes, &p("worker-rss.svg")),
    )?;
    add(
        "200-folder resync against mbsync",
        "folders.svg",
        folders(d, &p("folders.svg")),
    )?;
    Ok(out)
}

/// Grouped bars with min–max whiskers: `values[series][group]`.
struct Bars {
    title: String,
    y_desc: String,
    groups: Vec<String>,
    series: Vec<String>,
    values: Vec<Vec<Option<Spread>>>,
}

impl Bars {
    /// The top of the y axis: room above the tallest whisker for the
    /// value labels and the legend (upper left).
    fn ymax(&self) -> f64 {
        let top = self.values.iter().flatten().flatten().map(|v| v.2);
        top.fold(1.0, f64::max) * 1.5
    }

    fn any(&self) -> bool {
        self.values.iter().flatten().any(Option::is_some)
    }

    /// Only the groups with at least one figure (a mailbox not run is
    /// left out rather than drawn empty).
    fn filled(mut self) -> Bars {
        let keep: Vec<bool> = (0..self.groups.len())
            .map(|i| self.values.iter().any(|s| s[i].is_some()))
            .collect();
        let pick = |v: Vec<Option<Spread>>| {
            v.into_iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(x, _)| x)
                .collect()
        };
        self.values = self.values.into_iter().map(pick).collect();
        self.groups = self
            .groups
            .into_iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(g, _)| g)
            .collect();
        self
    }

    fn draw(&self, area: &Area) -> Result<()> {
        let n = self.groups.len() as f64;
        let ymax = self.ymax();
        let mut chart = ChartBuilder::on(area)
            .caption(&self.title, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..n, 0.0..ymax)
            .map_err(pe)?;
        let groups = self.groups.clone();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(self.groups.len() * 2 + 1)
            // (labels fall on the half steps: a group's name at its middle)
            .x_label_formatter(&move |x| {
                let i = x.floor() as usize;
                let middle = (x - x.floor() - 0.5).abs() < 0.01;
                groups
                    .get(i)
                    .filter(|_| middle)
                    .cloned()
                    .unwrap_or_default()
            })
            .y_label_formatter(&|y| crate::report::fmt(Some(*y), 0))
            .y_desc(self.y_desc.as_str())
            .draw()
            .map_err(pe)?;
        let w = 0.8 / self.series.len() as f64;
        for (j, name) in self.series.iter().enumerate() {
            let color = Palette99::pick(j).to_rgba();
            let bars = self.values[j].iter().enumerate().filter_map(|(i, v)| {
                let (m, _, _) = (*v)?;
                let x0 = i as f64 + 0.1 + j as f64 * w;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + w * 0.9, m)],
                    color.filled(),
                ))
            });
            chart
                .draw_series(bars)
                .map_err(pe)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
            self.whiskers_and_labels(&mut chart, j, w)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(pe)?;
        Ok(())
    }

    fn whiskers_and_labels<DB: DrawingBackend, X: Ranged<ValueType = f64>>(
        &self,
        chart: &mut ChartContext<DB, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
        j: usize,
        w: f64,
    ) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let ymax = self.ymax();
        for (i, v) in self.values[j].iter().enumerate() {
            let Some((m, lo, hi)) = *v else { continue };
            let x = i as f64 + 0.1 + j as f64 * w + w * 0.45;
            if hi > lo {
                chart
                    .draw_series([PathElement::new(
                        vec![(x, lo), (x, hi)],
                        BLACK.stroke_width(1),
                    )])
                    .map_err(pe)?;
            }
            let text = crate::report::fmt(Some(m), if m < 10.0 { 1 } else { 0 });
            chart
                .draw_series([Text::new(
                    text,
                    (x - w * 0.4, hi.max(m) + ymax * 0.025),
                    ("sans-serif", 9),
                )])
                .map_err(pe)?;
        }
        Ok(())
    }
}

/// msg/s of every scenario per mailbox, plus the 10k mailbox with
/// Cassandra pinned to a core of its own (the production shape).
fn initial_sync(d: &Data, mailboxes: &[String], path: &Path) -> Result<bool> {
    let series = [
        ("fetch_ceiling", "fetch ceiling"),
        ("store_ceiling", "store ceiling"),
        ("store_ceiling_marked", "store ceiling + delivered UPDATE"),
        ("mbsync", "mbsync"),
        ("caliopen_initial", "caliopen-imap, hand-off"),
        ("caliopen_store_only", "caliopen-imap, store-only"),
    ];
    let mut groups: Vec<(String, String, &str)> = mailboxes
        .iter()
        .map(|mb| (format!("{mb} mailbox"), mb.clone(), ""))
        .collect();
    groups.push(("10k, Cassandra pinned".into(), "10k".into(), "_pinned"));
    let bars = Bars {
        title: "Initial sync: msg/s (median, min–max over rounds)".into(),
        y_desc: "messages per second".into(),
        groups: groups.iter().map(|g| g.0.clone()).collect(),
        series: series.iter().map(|s| s.1.to_string()).collect(),
        values: series
            .iter()
            .map(|(s, _)| {
                groups
                    .iter()
                    .map(|(_, mb, suffix)| spread(d, &format!("{s}{suffix}"), mb, &msgs_s))
                    .collect()
            })
            .collect(),
    };
    if !bars.any() {
        return Ok(false);
    }
    let bars = bars.filled();
    let root = SVGBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    bars.draw(&root)?;
    root.present().map_err(pe)?;
    Ok(true)
}

/// Latencies of a live-latency row, sorted: every message's when the row
/// has them (`lat_ms`), else its percentiles at their ranks.
fn quantiles(r: &Value) -> Vec<(f64, f64)> {
    if let Some(all) = r.get("lat_ms").and_then(Value::as_array) {
        let mut v: Vec<f64> = all.iter().filter_map(Value::as_f64).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        return v
            .iter()
            .enumerate()
            .map(|(i, x)| (*x, (i + 1) as f64 / n))
            .collect();
    }
    [
        ("min_ms", 0.0),
        ("p50_ms", 0.5),
        ("p90_ms", 0.9),
        ("p99_ms", 0.99),
        ("max_ms", 1.0),
    ]
    .iter()
    .filter_map(|(k, q)| Some((num(r, k)?, *q)))
    .collect()
}

/// The share of messages handed off within x ms: IDLE push against a
/// `sync` order sent right after each APPEND.
fn latency(d: &Data, path: &Path) -> Result<bool> {
    let rows: Vec<Line<(f64, f64)>> = [
        ("live_latency_idle", RED, "IDLE push"),
        ("live_latency_order", BLUE, "sync order after each APPEND"),
    ]
    .into_iter()
    .filter_map(|(s, c, name)| Some((name, c, quantiles(d.one(s)?))))
    .filter(|(_, _, q)| !q.is_empty())
    .collect();
    if rows.is_empty() {
        return Ok(false);
    }
    let xmax = rows
        .iter()
        .flat_map(|r| r.2.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "APPEND on Dovecot → process_raw: share of messages within x ms",
            ("sans-serif", 17),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0..xmax, 0.0..1.02)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds")
        .y_desc("share of messages")
        .draw()
        .map_err(pe)?;
    for (name, color, q) in rows {
        let mut steps = vec![(q[0].0, 0.0)];
        for w in q.windows(2) {
            steps.extend([(w[1].0, w[0].1), (w[1].0, w[1].1)]);
        }
        steps.insert(1, q[0]);
        chart
            .draw_series(LineSeries::new(steps, color.stroke_width(2)))
            .map_err(pe)?
            .label(name)
            .legend(line_mark(color));
    }
    line_legend(&mut chart, &root, SeriesLabelPosition::LowerRight)
}

/// A line series' mark in its chart's legend.
fn line_mark(color: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
}

/// A line chart's legend at `at`, then the picture written out.
fn line_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    root: &DrawingArea<DB, Shift>,
    at: SeriesLabelPosition,
) -> Result<bool> {
    chart
        .configure_series_labels()
        .position(at)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(true)
}

/// Peak RSS of the worker's initial sync (and mbsync's) against the
/// mailbox's size in messages.
fn worker_rss(d: &Data, mailboxes: &[String], path: &Path) -> Result<bool> {
    let size = |mb: &str| {
        mb.trim_end_matches('k')
            .parse::<f64>()
            .ok()
            .map(|k| k * 1000.0)
    };
    let lines: Vec<Line<(f64, Spread)>> = [
        ("caliopen_initial", RED, "caliopen-imap worker"),
        ("mbsync", BLUE, "mbsync"),
    ]
    .into_iter()
    .map(|(s, c, name)| {
        let pts = mailboxes
            .iter()
            .filter_map(|mb| Some((size(mb)?, spread(d, s, mb, &rss)?)))
            .collect();
        (name, c, pts)
    })
    .collect();
    if lines.iter().all(|l| l.2.is_empty()) {
        return Ok(false);
    }
    let xmax = lines
        .iter()
        .flat_map(|l| l.2.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        * 1.1;
    let ymax = lines
        .iter()
        .flat_map(|l| l.2.iter().map(|p| p.1 .2))
        .fold(1.0, f64::max)
        * 1.2;
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Peak RSS of an initial sync against mailbox size",
            ("sans-serif", 17),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("messages in the mailbox")
        .x_label_formatter(&|x| crate::report::fmt(Some(*x), 0))
        .y_desc("MiB")
        .draw()
        .map_err(pe)?;
    for (name, color, pts) in lines {
        let whiskers = pts.iter().map(|(x, (_, lo, hi))| {
            PathElement::new(vec![(*x, *lo), (*x, *hi)], color.stroke_width(1))
        });
        chart.draw_series(whiskers).map_err(pe)?;
        chart
            .draw_series(
                LineSeries::new(pts.iter().map(|(x, v)| (*x, v.0)), color.stroke_width(2))
                    .point_size(4),
            )
            .map_err(pe)?
            .label(name)
            .legend(line_mark(color));
    }
    line_legend(&mut chart, &root, SeriesLabelPosition::UpperLeft)
}

/// The 200-folder identity: wall time and commands sent, caliopen-imap
/// against mbsync, for the first sync and the two resyncs.
fn folders(d: &Data, path: &Path) -> Result<bool> {
    let steps = [
        ("first", "first sync"),
        ("nochange", "resync, nothing new"),
        ("one_new", "resync, 1 new message"),
    ];
    let of = |f: Fig, prefix: &str| -> Vec<Option<Spread>> {
        steps
            .iter()
            .map(|(s, _)| {
                let sc = format!("{prefix}_{s}");
                d.label_of(&sc).and_then(|mb| spread(d, &sc, mb, f))
            })
            .collect()
    };
    let cmds = |r: &Value| num(r, "commands_total");
    let panel = |title: &str, y: &str, f: Fig| Bars {
        title: title.into(),
        y_desc: y.into(),
        groups: steps.iter().map(|s| s.1.to_string()).collect(),
        series: vec!["caliopen-imap".into(), "mbsync".into()],
        values: vec![of(f, "live_folders"), of(f, "mbsync_folders")],
    };
    let wall = panel("200 folders: wall ms", "milliseconds", &ms);
    let sent = panel("200 folders: IMAP commands sent", "commands", &cmds);
    if !wall.any() {
        return Ok(false);
    }
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let (left, right) = root.split_horizontally(550);
    wall.draw(&left)?;
    sent.draw(&right)?;
    root.present().map_err(pe)?;
    Ok(true)
}
