//! The whole cluster in one view, from Prometheus: every agent's per-edge
//! counters, as Prometheus scraped them, summed across nodes over a
//! window ([`counts`], [`report`]) and served as the report and Jaeger's
//! Trace Quality API by `tracegap quality` ([`serve`]). Any store that
//! answers Prometheus's HTTP query API (Thanos, Mimir, VictoriaMetrics)
//! will do: only `/api/v1/query`, `/api/v1/query_exemplars` and `/-/ready`
//! are asked.

pub mod counts;
pub mod report;
pub mod serve;

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;
use thiserror::Error;

/// Errors from asking Prometheus.
#[derive(Debug, Error)]
pub enum Error {
    #[error("Prometheus at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Prometheus did not answer within {0:?}")]
    Timeout(Duration),
    /// The query API's own error (`errorType`, `error`), or a status
    /// without one.
    #[error("Prometheus refused the query ({status} {kind}): {reason}")]
    Refused {
        status: u16,
        kind: String,
        reason: String,
    },
    #[error("Prometheus's answer is not the query API's JSON: {0}")]
    Decode(String),
    /// The HTTP client could not be built, or a credential file read.
    #[error("the HTTP client: {0}")]
    Client(String),
}

/// One series of an answer: its labels and its value (an instant vector),
/// or its samples (a range vector: seconds since the epoch, value).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
    pub samples: Vec<(f64, f64)>,
}

/// One series' exemplars: its labels, and each exemplar's labels and time
/// (seconds since the epoch).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeriesExemplars {
    pub labels: BTreeMap<String, String>,
    pub exemplars: Vec<(BTreeMap<String, String>, f64)>,
}

/// A Prometheus (or a store with its query API) at a base URL.
#[derive(Clone)]
pub struct Prometheus {
    client: std::sync::Arc<crate::remote::AuthClient>,
    base: String,
    timeout: Duration,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<RawSeries>,
}

#[derive(Deserialize)]
struct RawSeries {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    #[serde(default)]
    value: Option<(f64, String)>,
    #[serde(default)]
    values: Vec<(f64, String)>,
}

fn number(s: &str) -> Result<f64, Error> {
    s.parse()
        .map_err(|_| Error::Decode(format!("{s:?} is not a number")))
}

impl Prometheus {
    /// A client for the API at `url` (e.g. `http://prometheus:9090`), each
    /// query bounded by `timeout`, with `access`'s TLS and credentials.
    pub fn new(
        url: &str,
        timeout: Duration,
        access: &crate::remote::Access,
    ) -> Result<Self, Error> {
        let client = access
            .client(timeout)
            .map_err(|e| Error::Client(e.to_string()))?;
        Ok(Self {
            client: std::sync::Arc::new(client),
            base: url.trim_end_matches('/').to_owned(),
            timeout,
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn error(&self, e: reqwest::Error) -> Error {
        if e.is_timeout() {
            return Error::Timeout(self.timeout);
        }
        Error::Unreachable {
            url: self.base.clone(),
            reason: crate::remote::error_chain(&e),
        }
    }

    /// Evaluates `query` at `at`: an instant vector's series with their
    /// values, or a range selector's with their samples.
    pub async fn query(&self, query: &str, at: SystemTime) -> Result<Vec<Series>, Error> {
        let time = at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .append_pair("time", &format!("{time:.3}"))
            .finish();
        let (status, body) = self.post("/api/v1/query", form).await?;
        let answer: Answer = serde_json::from_slice(&body).map_err(|e| {
            if status == 200 {
                Error::Decode(e.to_string())
            } else {
                Error::Refused {
                    status,
                    kind: String::new(),
                    reason: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
                }
            }
        })?;
        if answer.status != "success" {
            return Err(Error::Refused {
                status,
                kind: answer.error_type.unwrap_or_default(),
                reason: answer.error.unwrap_or_default(),
            });
        }
        let data = answer.data.ok_or_else(|| Error::Decode("no data".into()))?;
        match data.result_type.as_str() {
            "vector" | "matrix" => {}
            other => return Err(Error::Decode(format!("a {other}, not a vector"))),
        }
        data.result
            .into_iter()
            .map(|r| {
                Ok(Series {
                    labels: r.metric,
                    value: match &r.value {
                        Some((_, v)) => number(v)?,
                        None => 0.0,
                    },
                    samples: r
                        .values
                        .iter()
                        .map(|(t, v)| Ok((*t, number(v)?)))
                        .collect::<Result<_, Error>>()?,
                })
            })
            .collect()
    }

    /// The exemplars of `query`'s series between `start` and `end`: per
    /// series, its labels and its exemplars' (labels, seconds since the
    /// epoch). Empty where Prometheus keeps none (it keeps them with
    /// `--enable-feature=exemplar-storage`).
    pub async fn exemplars(
        &self,
        query: &str,
        start: SystemTime,
        end: SystemTime,
    ) -> Result<Vec<SeriesExemplars>, Error> {
        let secs = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        };
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .append_pair("start", &format!("{:.3}", secs(start)))
            .append_pair("end", &format!("{:.3}", secs(end)))
            .finish();
        let body = self.post("/api/v1/query_exemplars", form).await?;
        #[derive(Deserialize)]
        struct Answer {
            status: String,
            #[serde(default)]
            data: Vec<Raw>,
            #[serde(default)]
            error: Option<String>,
        }
        #[derive(Deserialize)]
        struct Raw {
            #[serde(rename = "seriesLabels")]
            series_labels: BTreeMap<String, String>,
            #[serde(default)]
            exemplars: Vec<RawExemplar>,
        }
        #[derive(Deserialize)]
        struct RawExemplar {
            labels: BTreeMap<String, String>,
            timestamp: f64,
        }
        let a: Answer =
            serde_json::from_slice(&body.1).map_err(|e| Error::Decode(e.to_string()))?;
        if a.status != "success" {
            return Err(Error::Refused {
                status: body.0,
                kind: "exemplars".into(),
                reason: a.error.unwrap_or_default(),
            });
        }
        Ok(a.data
            .into_iter()
            .map(|r| SeriesExemplars {
                labels: r.series_labels,
                exemplars: r
                    .exemplars
                    .into_iter()
                    .map(|e| (e.labels, e.timestamp))
                    .collect(),
            })
            .collect())
    }

    /// POSTs a form to `path`: (status, body).
    async fn post(&self, path: &str, form: String) -> Result<(u16, bytes::Bytes), Error> {
        let sent = self
            .client
            .request(reqwest::Method::POST, &format!("{}{path}", self.base))
            .map_err(|e| Error::Client(e.to_string()))?
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| self.error(e))?;
        let status = sent.status().as_u16();
        let body = sent.bytes().await.map_err(|e| self.error(e))?;
        Ok((status, body))
    }

    /// Whether Prometheus is up and serving queries (`/-/ready`).
    pub async fn ready(&self) -> Result<(), Error> {
        let sent = self
            .client
            .get(&format!("{}/-/ready", self.base))
            .map_err(|e| Error::Client(e.to_string()))?
            .send()
            .await
            .map_err(|e| self.error(e))?;
        let status = sent.status().as_u16();
        if status == 200 {
            return Ok(());
        }
        let body = sent.text().await.unwrap_or_default();
        Err(Error::Refused {
            status,
            kind: "not ready".into(),
            reason: body.trim().to_owned(),
        })
    }
}

/// A PromQL duration of whole seconds (`3600s`).
pub fn duration(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}
