//! BENCHMARKS.md (and the live-only LIVE.md) from the raw figures of a run,
//! `results.jsonl`: one JSON object per measurement. Each figure is the
//! median over rounds with the spread (min–max) beside it, so one noisy
//! round neither hides nor invents a difference. MB are 10^6 bytes, RSS is
//! in MiB, ratios divide medians.
//!
//! The report reads only the raw file (and the machine's description), so
//! it can be rewritten from an old run: `bench report RESULTS MACHINE ...`.
//! Sections are functions of this folder called in order by [`markdown`];
//! a new section is one more function and one more line there.

mod live;
mod sync;
mod targets;

pub use sync::mailboxes as sync_mailboxes;

use std::fmt::Write as _;

use serde_json::Value;

/// The rows of a run, grouped by (scenario, mailbox) in order of first
/// appearance; a sync that never reported is no figure and is kept apart.
pub struct Data {
    by: Vec<((String, String), Vec<Value>)>,
    hangs: Vec<Value>,
    rows: Vec<Value>,
}

/// How the run was made: what the header says.
pub struct Run {
    pub machine: Value,
    pub wall: u64,
    pub total: u64,
    pub rounds: u32,
    pub large: bool,
    pub only_live: bool,
    /// Relative paths of the pictures to link (empty: none drawn).
    pub pictures: Vec<(String, String)>,
}

impl Data {
    pub fn parse(text: &str) -> anyhow::Result<Data> {
        let mut d = Data {
            by: Vec::new(),
            hangs: Vec::new(),
            rows: Vec::new(),
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let r: Value = serde_json::from_str(line)?;
            d.rows.push(r.clone());
            if r.get("hung").and_then(Value::as_bool) == Some(true) {
                d.hangs.push(r);
                continue;
            }
            let key = (text_of(&r, "scenario"), text_of(&r, "mailbox"));
            match d.by.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(r),
                None => d.by.push((key, vec![r])),
            }
        }
        Ok(d)
    }

    pub fn rows(&self, scenario: &str, mailbox: &str) -> &[Value] {
        self.by
            .iter()
            .find(|((s, m), _)| s == scenario && m == mailbox)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    }

    pub fn has(&self, scenario: &str, mailbox: &str) -> bool {
        !self.rows(scenario, mailbox).is_empty()
    }

    pub fn has_mailbox(&self, mailbox: &str) -> bool {
        self.by.iter().any(|((_, m), _)| m == mailbox)
    }

    /// Every row of a scenario whatever its label, in order.
    pub fn all_of(&self, scenario: &str) -> Vec<&Value> {
        self.by
            .iter()
            .filter(|((s, _), _)| s == scenario)
            .flat_map(|(_, v)| v.iter())
            .collect()
    }

    /// The row of a scenario run once (live sync runs one round; its label
    /// says how many accounts, identities or folders it had).
    pub fn one(&self, scenario: &str) -> Option<&Value> {
        self.all_of(scenario).last().copied()
    }

    pub fn label_of(&self, scenario: &str) -> Option<&str> {
        self.by
            .iter()
            .find(|((s, _), _)| s == scenario)
            .map(|((_, m), _)| m.as_str())
    }

    pub fn values(&self, scenario: &str, mailbox: &str, f: Fig) -> Vec<f64> {
        self.rows(scenario, mailbox).iter().filter_map(f).collect()
    }

    pub fn med(&self, scenario: &str, mailbox: &str, f: Fig) -> Option<f64> {
        median(&self.values(scenario, mailbox, f))
    }

    /// Median (min–max), or the one value, or "–".
    pub fn cell(&self, scenario: &str, mailbox: &str, f: Fig, digits: usize) -> String {
        let v = self.values(scenario, mailbox, f);
        let Some(m) = median(&v) else {
            return "–".into();
        };
        if v.len() == 1 {
            return fmt(Some(m), digits);
        }
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!(
            "{} ({}–{})",
            fmt(Some(m), digits),
            fmt(Some(lo), digits),
            fmt(Some(hi), digits)
        )
    }

    /// `values` of a live scenario, whatever its label.
    pub fn values_any(&self, scenario: &str, f: Fig) -> Vec<f64> {
        self.label_of(scenario)
            .map(|mb| self.values(scenario, mb, f))
            .unwrap_or_default()
    }

    pub fn cell_any(&self, scenario: &str, f: Fig, digits: usize) -> String {
        match self.label_of(scenario) {
            Some(mb) => self.cell(scenario, mb, f, digits),
            None => "–".into(),
        }
    }

    fn any_scenario(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.by.iter().any(|((s, _), _)| pred(s))
    }

    /// The raw rows, hung ones included (the settle waits are read here).
    pub fn raw(&self) -> &[Value] {
        &self.rows
    }
}

/// A figure taken from one row; None when the row lacks it (a missing or
/// null field, a division by zero), as the row is then left out.
pub type Fig<'a> = &'a dyn Fn(&Value) -> Option<f64>;

pub fn num(r: &Value, key: &str) -> Option<f64> {
    r.get(key)?.as_f64()
}

pub fn div(a: f64, b: f64) -> Option<f64> {
    (b != 0.0).then(|| a / b)
}

pub fn msgs_s(r: &Value) -> Option<f64> {
    div(num(r, "messages")?, num(r, "secs")?)
}

pub fn mb_s(r: &Value) -> Option<f64> {
    div(num(r, "bytes")?, num(r, "secs")?).map(|v| v / 1e6)
}

pub fn rss(r: &Value) -> Option<f64> {
    num(r, "rss_kb").map(|v| v / 1024.0)
}

pub fn secs(r: &Value) -> Option<f64> {
    num(r, "secs")
}

pub fn ms(r: &Value) -> Option<f64> {
    num(r, "secs").map(|s| s * 1000.0)
}

/// A field as the report prints it: numbers as JSON writes them, text as
/// it is, null as "None" (as the former Python report did).
pub fn show(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "None".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => if *b { "True" } else { "False" }.into(),
        Some(other) => other.to_string(),
    }
}

fn text_of(r: &Value, key: &str) -> String {
    match r.get(key) {
        Some(Value::String(s)) => s.clone(),
        other => show(other),
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// `digits` decimals, or thousands with separators and none at 1,000 and
/// over; "–" for no figure.
pub fn fmt(v: Option<f64>, digits: usize) -> String {
    match v {
        None => "–".into(),
        Some(v) if v.abs() >= 1000.0 => thousands(v),
        Some(v) => format!("{v:.digits$}"),
    }
}

/// `1,234` (no decimals).
pub fn thousands(v: f64) -> String {
    let s = format!("{v:.0}");
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// A count as `{:g}` writes it (every count here is a whole number).
pub fn g(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

pub fn ratio(x: Option<f64>, y: Option<f64>) -> String {
    match (x, y) {
        (Some(x), Some(y)) if x != 0.0 && y != 0.0 => format!("{:.2}×", x / y),
        _ => "–".into(),
    }
}

/// Some(x) only when x is a non-zero figure (the old report's truthiness).
pub fn nz(x: Option<f64>) -> Option<f64> {
    x.filter(|v| *v != 0.0)
}

/// The whole page, section by section.
pub fn markdown(d: &Data, run: &Run) -> String {
    let mut o = String::new();
    header(&mut o, run);
    pictures(&mut o, run);
    if run.only_live {
        live::section(&mut o, d);
        o.push_str(
            "Raw figures of this run: `.stack/bench/results-live.jsonl`; worker logs beside it.",
        );
        return o;
    }
    let mailboxes = sync::mailboxes(run.large);
    for mb in &mailboxes {
        sync::initial(&mut o, d, mb);
    }
    sync::production(&mut o, d);
    sync::waits(&mut o, d);
    sync::large(&mut o, d);
    sync::tuning(&mut o, d);
    sync::scale(&mut o, d, &mailboxes);
    sync::poller(&mut o, d);
    live::section(&mut o, d);
    targets::section(&mut o, d);
    hangs(&mut o, d);
    o.push_str(
        "Raw figures of this run: `.stack/bench/results.jsonl` (one JSON object per \
         measurement); worker and poller logs beside it.",
    );
    o
}

fn header(o: &mut String, run: &Run) {
    let m = &run.machine;
    let date = m.get("date").and_then(Value::as_str).unwrap_or("");
    let _ = writeln!(o, "# Benchmarks\n");
    if run.only_live {
        let _ = writeln!(
            o,
            "Written by `scripts/bench.sh --only live` on {date}: the live-sync scenarios \
             alone, one round. RSS in MiB.\n"
        );
    } else {
        let _ = writeln!(
            o,
            "Written by `scripts/bench.sh` on {date} (`make bench`{}); {} rounds, every \
             scenario once per round in a rotated order. Figures: median (min–max) over \
             rounds. MB = 10^6 bytes; RSS = peak resident set (VmHWM), MiB.\n",
            if run.large { ", `--large`" } else { "" },
            run.rounds
        );
    }
    let _ = writeln!(o, "## Machine\n\n| | |\n|---|---|");
    for (k, label) in [
        ("cpu", "CPU"),
        ("cores", "Cores"),
        ("mem", "Memory"),
        ("os", "OS"),
        ("kernel", "Kernel"),
        ("rustc", "rustc"),
        ("dovecot", "Dovecot"),
        ("cassandra", "Cassandra"),
        ("java", "JVM"),
        ("nats", "NATS"),
        ("mbsync", "mbsync"),
        ("commit", "caliopen-imap commit"),
    ] {
        let v = m.get(k).map(|_| text_of(m, k)).unwrap_or_default();
        let _ = writeln!(o, "| {label} | {v} |");
    }
    let _ = writeln!(
        o,
        "| Suite wall time | {} s in all, {} s after the build |\n",
        run.total, run.wall
    );
    o.push_str(
        "Everything runs on this one machine over loopback: Dovecot (IMAPS, TLS verified), \
         single-node Cassandra (1 GiB heap), NATS, the worker and the processor stand-in \
         (`examples/lda_standin.rs`) share its cores.\n\n",
    );
    o.push_str(
        "Corpus: generated by `examples/bench_tool.rs corpus` from a fixed seed (the same \
         bytes every run), written as Maildir files: 80 % 1–20 KB, 18 % 20–200 KB, 2 % \
         0.2–2 MB (≈ 48 KB on average), multipart MIME with base64 attachments, RFC 2047 \
         UTF-8 headers, UTF-8 bodies. The large-message mailbox (200L) has every tenth \
         message of 1–20 MB, the others as above.\n\n",
    );
}

fn hangs(o: &mut String, d: &Data) {
    if d.hangs.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "## Syncs that never finished\n\n{} measured sync(s) sent no final report within \
         the timeout and are left out of every figure above (their worker was killed and \
         the suite went on with a fresh one). `.stack/bench/hangs.txt` holds the request \
         counts of the Cassandra connections at that moment.\n",
        d.hangs.len()
    );
    let _ = writeln!(o, "| Scenario | Mailbox | Round |\n|---|---|---|");
    for r in &d.hangs {
        let _ = writeln!(
            o,
            "| {} | {} | {} |",
            text_of(r, "scenario"),
            text_of(r, "mailbox"),
            show(r.get("round"))
        );
    }
    o.push('\n');
}

/// The pictures drawn from the same figures (`charts.rs`), linked before
/// the tables they summarise.
fn pictures(o: &mut String, run: &Run) {
    if run.pictures.is_empty() {
        return;
    }
    let _ = writeln!(o, "## Pictures\n");
    for (title, path) in &run.pictures {
        let _ = writeln!(o, "![{title}]({path})\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_as_the_tables_always_did() {
        assert_eq!(fmt(Some(1868.6), 0), "1,869");
        assert_eq!(fmt(Some(1234567.0), 1), "1,234,567");
        assert_eq!(fmt(Some(0.125), 2), "0.12");
        assert_eq!(fmt(None, 1), "–");
        assert_eq!(g(400.0), "400");
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), Some(2.5));
        assert_eq!(ratio(Some(1.0), Some(0.0)), "–");
    }
}
