//! The floor under `routeplane serve`: a reverse proxy built from the same
//! parts and nothing else. One single-threaded tokio runtime per core on
//! `SO_REUSEPORT` listeners (routeplane's own `bind_workers`), hyper's HTTP/1
//! server, and a hyper client per thread with a keep-alive pool; the request
//! body is read whole and forwarded, the answer streamed back. No parsing, no
//! policy, no accounting.
//!
//! `benches/proxy.sh` runs the same load through it, so the report splits
//! routeplane's cost per request into what the HTTP stack costs (this) and
//! what routing adds (the rest).
//!
//!     cargo run --release --example hyper_floor -- 127.0.0.1:18184 http://127.0.0.1:18181
#![allow(clippy::print_stderr, reason = "a benchmark tool's own messages")]

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

type HttpClient = Client<HttpConnector, Full<Bytes>>;
type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;

thread_local! {
    static CLIENT: HttpClient = {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        Client::builder(TokioExecutor::new()).build(http)
    };
}

fn fail(status: StatusCode, why: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(why))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

async fn forward(upstream: Arc<str>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return fail(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = match format!("{upstream}{path}").parse() {
        Ok(u) => u,
        Err(e) => return fail(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    let mut out = Request::new(Full::new(body));
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    for name in [hyper::header::CONTENT_TYPE, hyper::header::AUTHORIZATION] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    let sent = CLIENT.with(|c| c.request(out));
    match sent.await {
        Ok(r) => r.map(BodyExt::boxed_unsync),
        Err(e) => fail(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: hyper_floor LISTEN_ADDR UPSTREAM_URL   (e.g. 127.0.0.1:18184 http://127.0.0.1:18181)");
        return std::process::ExitCode::from(2);
    };
    let addr: std::net::SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hyper_floor: invalid listen address `{listen}`: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let upstream: Arc<str> = upstream.trim_end_matches('/').into();
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let listeners = match routeplane::gateway::server::bind_workers(addr, workers) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hyper_floor: cannot listen on `{addr}`: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    eprintln!("hyper_floor: {workers} workers on http://{addr} -> {upstream}");
    let threads: Vec<std::thread::JoinHandle<std::io::Result<()>>> = listeners
        .into_iter()
        .map(|listener| {
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    loop {
                        let (stream, _) = listener.accept().await?;
                        let _ = stream.set_nodelay(true);
                        let upstream = upstream.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| {
                                let upstream = upstream.clone();
                                async move {
                                    Ok::<_, std::convert::Infallible>(forward(upstream, req).await)
                                }
                            });
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                })
            })
        })
        .collect();
    for t in threads {
        match t.join() {
            Ok(Err(e)) => eprintln!("hyper_floor: worker stopped: {e}"),
            Err(_) => eprintln!("hyper_floor: worker panicked"),
            Ok(Ok(())) => {}
        }
    }
    std::process::ExitCode::from(1)
}
