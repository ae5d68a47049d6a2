//! The lab service on one async thread: a tokio current-thread runtime
//! that reads many requests before it calls out for any, as tokio,
//! asyncio, Node and Go serve them. The threads' turns cannot tie its calls
//! to its requests (one thread read them all); tracegap must say so and
//! fall back to other evidence. HTTP/1.1 only; behaves as [`ServiceSpec`]
//! says, records the cause of each call as the threaded service does.
//! [`Runtime::AsyncHanded`] reads each call's answer in a task of its own
//! and hands it over, as hyper's client does.

use std::{
    net::{Ipv6Addr, SocketAddr},
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::service::{
    Inbound, Runtime, ServiceSpec, Serving, answer, count_call, header_map, up_to,
};

/// Serves `spec` on this thread until `stop` is set; `ready` is told
/// whether listening worked.
pub(crate) fn serve_until(
    spec: ServiceSpec,
    provider: Option<SdkTracerProvider>,
    stop: &Arc<AtomicBool>,
    ready: impl FnOnce(std::io::Result<()>),
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return ready(Err(e)),
    };
    let keep = provider.clone();
    // The SDK's exporter here is synchronous (reqwest's blocking client,
    // which must not run inside a runtime): spans end on a thread of
    // their own, off the requests' path, as a batching exporter would.
    let (ender, ends) = std::sync::mpsc::channel::<opentelemetry::Context>();
    let ending = std::thread::spawn(move || {
        for cx in ends {
            cx.span().end();
        }
    });
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let listener =
            match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, spec.port))).await {
                Ok(l) => l,
                Err(e) => return ready(Err(e)),
            };
        ready(Ok(()));
        let spec = Rc::new(spec);
        let provider = Rc::new(provider);
        while !stop.load(Ordering::Relaxed) {
            let accepted = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
            let Ok(Ok((conn, peer))) = accepted else {
                continue;
            };
            let (spec, provider, stop, ender) =
                (spec.clone(), provider.clone(), stop.clone(), ender.clone());
            tokio::task::spawn_local(async move {
                serve(conn, peer, &spec, provider.as_ref().as_ref(), &stop, &ender).await
            });
        }
    });
    drop(local);
    drop(ender);
    let _ = ending.join();
    if let Some(p) = keep {
        let _ = p.shutdown();
    }
}

/// One connection's requests, one after the other (keep-alive).
async fn serve(
    mut conn: TcpStream,
    peer: SocketAddr,
    spec: &ServiceSpec,
    provider: Option<&SdkTracerProvider>,
    stop: &AtomicBool,
    ender: &std::sync::mpsc::Sender<opentelemetry::Context>,
) {
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut conn, &mut buf, stop).await {
        let headers = header_map(&head);
        let target = head.split(' ').nth(1).unwrap_or("/").to_owned();
        let path = target.split('?').next().unwrap_or("/").to_owned();
        let serving = Serving::begin(spec, provider, &headers, &Inbound::Http(&path), Some(peer));
        for url in &spec.downstream {
            let (client_cx, out) = serving.outbound(url);
            tokio::time::sleep(up_to(spec.think)).await;
            let called = call(url, &out, &serving, spec.runtime == Runtime::AsyncHanded).await;
            count_call(url, called.is_err());
            if let Err(e) = called {
                eprintln!("{}: calling {url} for {path}: {e}", spec.name);
            }
            if let Some(cx) = client_cx {
                let _ = ender.send(cx);
            }
        }
        if !spec.delay.is_zero() {
            tokio::time::sleep(spec.delay).await;
        }
        if let Some(cx) = serving.server_cx.clone() {
            let _ = ender.send(cx);
        }
        if conn.write_all(answer(spec).as_bytes()).await.is_err() {
            return;
        }
        if headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            return;
        }
    }
}

/// A request head (requests here carry no body), or None at the end.
async fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>, stop: &AtomicBool) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(50), conn.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_elapsed) => {}
        }
    }
}

/// GET `url` (http://ip:port/path) with `headers` on a new connection,
/// the call's cause recorded once its address is known; `handed`: the
/// exchange in a task of its own.
async fn call(
    url: &str,
    headers: &[(String, String)],
    serving: &Serving<'_>,
    handed: bool,
) -> std::io::Result<u16> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let c = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(authority))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
    serving.caused(c.local_addr()?);
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    if handed {
        return tokio::task::spawn_local(exchange(c, req))
            .await
            .map_err(std::io::Error::other)?;
    }
    exchange(c, req).await
}

/// Sends `req` on `c`, reads the answer to its end: its status.
async fn exchange(mut c: TcpStream, req: String) -> std::io::Result<u16> {
    c.write_all(req.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "answer"))??;
    let status = String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(status)
}
