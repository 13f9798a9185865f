//! The baseline: the least a hyper server can do for the same requests. It reads each body
//! whole and answers 200 `{}`, on the same kind of runtime herald uses (tokio multi-thread,
//! default worker count), the same connection builder (hyper-util auto: HTTP/1.1 + h2) and the
//! same socket options (herald leaves Nagle on for accepted sockets, so this does too).
//!
//! The bench binary runs this when re-executed as `loadtest --serve-bare ADDR`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;

pub fn serve(addr: SocketAddr) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bare server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("bare server: cannot bind {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let builder = Builder::new(TokioExecutor::new());
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let connection = builder.serve_connection(TokioIo::new(tcp), service_fn(answer));
            let connection = connection.into_owned();
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    })
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let _ = req.into_body().collect().await;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("static response"))
}
