//! The tracing lab: the seed's Kubernetes lab reproduced on one Linux
//! machine. Pods are network namespaces on a bridge ([`netns`]), on two
//! nodes with kube-proxy-style Services between them ([`cluster`]), services
//! are real HTTP programs with the propagation behaviours the seed shows
//! ([`service`]; gRPC ones through [`grpc`]), the trace store is a real OTLP receiver ([`store`]), and
//! tracegap's agent runs on the pods' veths ([`agent`]), in-process or from
//! its image as deploy/base's DaemonSet says ([`container`]). [`scenario`] holds
//! one scenario per seed lesson; [`tree`], [`files`] and [`query`] (Jaeger's
//! query API and UI) show the traces.

pub mod agent;
pub mod bench;
pub mod causality;
pub mod cluster;
pub mod container;
pub mod files;
pub mod grpc;
pub mod http;
pub mod load;
pub mod multiplexed;
pub mod netns;
pub mod pki;
pub mod prometheus;
pub mod query;
pub mod run;
pub mod scenario;
pub mod secure;
pub mod serve;
pub mod service;
pub mod store;
pub mod tls;
pub mod tree;
