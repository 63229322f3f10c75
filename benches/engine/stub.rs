//! The loopback HTTP service the API no-op steps call: `POST /noop/{tag}` answers `{}` at
//! once. A scenario may wait for the call carrying a tag (the moment a step started, as the
//! outside world sees it).
//! May call: nothing beyond its socket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Json;
use axum::extract::{Path, State};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::Outcome;

#[derive(Default)]
struct Calls {
    waiting: Mutex<HashMap<String, oneshot::Sender<Instant>>>,
    count: AtomicU64,
}

/// The stub, serving on a loopback port until the bench ends.
#[derive(Clone)]
pub struct Stub {
    pub base_url: String,
    calls: Arc<Calls>,
}

impl Stub {
    pub async fn start() -> Outcome<Self> {
        let calls = Arc::new(Calls::default());
        let router =
            axum::Router::new().route("/noop/{tag}", post(answer)).with_state(calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                eprintln!("the API stub stopped: {error}");
            }
        });
        Ok(Self { base_url: format!("http://{address}"), calls })
    }

    /// Resolves when the call carrying `tag` arrives, with its arrival time.
    pub fn expect(&self, tag: &str) -> oneshot::Receiver<Instant> {
        let (sender, receiver) = oneshot::channel();
        if let Ok(mut waiting) = self.calls.waiting.lock() {
            waiting.insert(tag.to_owned(), sender);
        }
        receiver
    }

    /// Calls answered so far.
    pub fn calls(&self) -> u64 {
        self.calls.count.load(Ordering::Relaxed)
    }

    /// The configuration of an API agent that calls the stub (loopback: the SSRF guard must be
    /// told `allowPrivateNetwork`).
    pub fn agent_config(&self) -> Value {
        json!({ "api": {
            "method": "POST",
            "urlTemplate": format!("{}/noop/{{{{input.tag}}}}", self.base_url),
            "bodyTemplate": "{}",
            "timeout": "30s",
            "allowPrivateNetwork": true,
        } })
    }
}

async fn answer(State(calls): State<Arc<Calls>>, Path(tag): Path<String>) -> Json<Value> {
    let arrived = Instant::now();
    calls.count.fetch_add(1, Ordering::Relaxed);
    let waiter = calls.waiting.lock().ok().and_then(|mut waiting| waiting.remove(&tag));
    if let Some(waiter) = waiter {
        let _ = waiter.send(arrived);
    }
    Json(json!({}))
}
