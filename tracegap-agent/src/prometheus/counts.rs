//! What a counter counted over a window, exactly, across every agent that
//! exported it: PromQL's `increase()` extrapolates to the window's edges
//! and misses what a series held when it was first scraped (an edge seen
//! between two scrapes), so the page would disagree with the agents' own
//! reports. Instead, per series: its last value in the window less its
//! value at the window's start, or all of it when it started within the
//! window (the agents' counters start at zero); a series that reset (an
//! agent restarted) is read sample by sample, each drop a new start. Series
//! that ended in the window (an agent's pod replaced) count up to their
//! last sample.

use std::{collections::BTreeMap, time::Duration, time::SystemTime};

use super::{Error, Prometheus, Series, duration};

/// Labels to values.
pub type Labels = BTreeMap<String, String>;

/// How far back a sample still stands for "now" (Prometheus's default
/// lookback delta): the raw read of a reset series starts that much before
/// the window, for its value at the start.
const LOOKBACK: Duration = Duration::from_secs(300);

/// What `metric` counted in the `window` before `at`, summed by the labels
/// `by`, every group with a count above zero.
pub async fn over_window(
    prom: &Prometheus,
    metric: &str,
    by: &[&str],
    window: Duration,
    at: SystemTime,
) -> Result<Vec<(Labels, u64)>, Error> {
    let w = duration(window);
    let steady = format!(
        "((last_over_time({metric}[{w}]) - {metric} offset {w}) or last_over_time({metric}[{w}])) \
         unless resets({metric}[{w}]) > 0"
    );
    let mut sums: BTreeMap<Labels, f64> = BTreeMap::new();
    let mut add = |labels: &Labels, n: f64| {
        let key: Labels = by
            .iter()
            .map(|k| ((*k).to_owned(), labels.get(*k).cloned().unwrap_or_default()))
            .collect();
        *sums.entry(key).or_default() += n;
    };
    let mut to_read: Vec<Labels> = Vec::new();
    for s in prom.query(&steady, at).await? {
        if s.value < 0.0 {
            // Reset between the window's start and its first sample.
            to_read.push(s.labels);
        } else {
            add(&s.labels, s.value);
        }
    }
    let reset = format!("resets({metric}[{w}]) > 0");
    to_read.extend(prom.query(&reset, at).await?.into_iter().map(|s| s.labels));
    let start = at
        .checked_sub(window)
        .unwrap_or(SystemTime::UNIX_EPOCH)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let reach = duration(window + LOOKBACK);
    for labels in to_read {
        let selector = format!("{metric}{}[{reach}]", matchers(&labels));
        for s in prom.query(&selector, at).await? {
            add(&labels, counted(&s, start));
        }
    }
    Ok(sums
        .into_iter()
        .map(|(k, v)| (k, v.round() as u64))
        .filter(|(_, n)| *n > 0)
        .collect())
}

/// What a series' samples counted after `start` (seconds since the
/// epoch): from its last value at or before `start` (zero if it had none),
/// each drop a restart from zero.
pub fn counted(s: &Series, start: f64) -> f64 {
    let mut prev = s
        .samples
        .iter()
        .take_while(|(t, _)| *t <= start)
        .last()
        .map_or(0.0, |(_, v)| *v);
    let mut total = 0.0;
    for (_, v) in s.samples.iter().filter(|(t, _)| *t > start) {
        total += if *v >= prev { v - prev } else { *v };
        prev = *v;
    }
    total
}

/// `{a="1",b="2"}` matching exactly `labels` (the name left out).
fn matchers(labels: &Labels) -> String {
    let inner: Vec<String> = labels
        .iter()
        .filter(|(k, _)| k.as_str() != "__name__")
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(samples: &[(f64, f64)]) -> Series {
        Series {
            samples: samples.to_vec(),
            ..Series::default()
        }
    }

    #[test]
    fn a_series_counts_from_the_windows_start_through_restarts() {
        // 5 before the window; 5 → 9, a restart, 0 → 4: 4 + 4.
        let s = series(&[(90.0, 5.0), (110.0, 9.0), (120.0, 1.0), (130.0, 4.0)]);
        assert_eq!(counted(&s, 100.0), 4.0 + 1.0 + 3.0);
        // Born within the window: all of it.
        let s = series(&[(110.0, 3.0), (120.0, 7.0)]);
        assert_eq!(counted(&s, 100.0), 7.0);
        // Nothing after the start.
        let s = series(&[(90.0, 5.0)]);
        assert_eq!(counted(&s, 100.0), 0.0);
    }

    #[test]
    fn matchers_quote_what_they_match() {
        let labels: Labels = [
            ("__name__", "x"),
            ("source_service", "a\"b"),
            ("instance", "10.0.0.1:9464"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(
            matchers(&labels),
            r#"{instance="10.0.0.1:9464",source_service="a\"b"}"#
        );
    }
}
