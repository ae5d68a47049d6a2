//! Traces as trees in the terminal: each span under its parent, synthetic
//! spans marked `*` with the gap they fill, missing parents shown as such.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::store::Received;

fn kind(k: i32) -> &'static str {
    match k {
        1 => "internal",
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "unspecified",
    }
}

fn line(s: &Received) -> String {
    let ms = (s
        .span
        .end_time_unix_nano
        .saturating_sub(s.span.start_time_unix_nano)) as f64
        / 1e6;
    let mark = if s.synthetic() { "*" } else { " " };
    let mut l = format!(
        "{mark} {}  {}  [{}] {ms:.1}ms",
        s.service,
        s.span.name,
        kind(s.span.kind)
    );
    if let Some(g) = s.gap() {
        l.push_str(&format!("  gap={g}"));
        if let Some(link) = s.attr("tracegap.link") {
            l.push_str(&format!(" link={link}"));
        }
        if let Some(c) = s.attr("tracegap.link.confidence") {
            l.push_str(&format!(" ({c})"));
        }
        if s.attr("tracegap.parent").as_deref() == Some("store") {
            l.push_str(" parent=from store");
        }
        for link in &s.span.links {
            let t = crate::store::hex(&link.trace_id);
            match crate::store::link_kind(link).as_deref() {
                Some("candidate") => l.push_str(&format!("  ~ candidate {t}")),
                _ => l.push_str(&format!("  -> {}'s own trace {t}", s.service)),
            }
        }
    }
    if let Some(st) = &s.span.status
        && st.code == 2
    {
        l.push_str(&format!("  ERROR {}", st.message));
    }
    l
}

/// Renders the spans of one trace.
pub fn render(trace_id: &str, spans: &[&Received]) -> String {
    let ids: HashSet<String> = spans.iter().map(|s| s.span_id()).collect();
    let mut children: HashMap<String, Vec<&Received>> = HashMap::new();
    // Parents that are not in the store: roots of fragments.
    let mut missing: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    let mut roots = Vec::new();
    for s in spans {
        let p = s.parent_span_id();
        if p.is_empty() {
            roots.push(*s);
        } else if ids.contains(&p) {
            children.entry(p).or_default().push(*s);
        } else {
            missing.entry(p).or_default().push(*s);
        }
    }
    let by_start = |v: &mut Vec<&Received>| v.sort_by_key(|s| s.span.start_time_unix_nano);
    roots.sort_by_key(|s| s.span.start_time_unix_nano);
    for v in children.values_mut() {
        by_start(v);
    }
    let synthetic = spans.iter().filter(|s| s.synthetic()).count();
    let mut out = format!(
        "trace {trace_id}: {} spans, {synthetic} synthetic (*)\n",
        spans.len()
    );
    fn walk(
        s: &Received,
        depth: usize,
        children: &HashMap<String, Vec<&Received>>,
        out: &mut String,
    ) {
        out.push_str(&format!("  {}{}\n", "   ".repeat(depth), line(s)));
        for c in children.get(&s.span_id()).into_iter().flatten() {
            walk(c, depth + 1, children, out);
        }
    }
    for r in roots {
        walk(r, 0, &children, &mut out);
    }
    for (parent, mut kids) in missing {
        by_start(&mut kids);
        out.push_str(&format!(
            "  ? span {parent} (not in the store: the caller's span, unsampled or not exported)\n"
        ));
        for k in kids {
            walk(k, 1, &children, &mut out);
        }
    }
    out
}
