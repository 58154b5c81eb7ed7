//! The proxy application behind a gate that decides when idle connections are told to close.
//!
//! Pingora's listening service calls its application's `cleanup` the moment the accept loops
//! end, and the proxy's cleanup wakes every connection still waiting for a request header and
//! drops it. That includes a connection accepted a moment before the stop whose request is
//! on its way or already in the socket buffer: dropping it with unread bytes resets it (one
//! request in about 2,000 failed that way in an upgrade under load). Here the service's own
//! `cleanup` does nothing; the balancer's drain calls [`Gate::close_idle`] once freshly
//! accepted connections have had a moment to be read.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;

use crate::app::App;

/// Shares one `HttpProxy` between the listening service and the balancer that drains it.
#[derive(Clone)]
pub struct Gate(Arc<HttpProxy<App>>);

impl Gate {
    pub fn new(proxy: HttpProxy<App>) -> Gate {
        Gate(Arc::new(proxy))
    }

    /// Closes connections waiting for their next request (keep-alive ones, and fresh ones whose
    /// client has sent nothing yet); requests being served finish, without keep-alive.
    pub async fn close_idle(&self) {
        ServerApp::cleanup(&*self.0).await;
    }
}

#[async_trait]
impl ServerApp for Gate {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.0.process_new(session, shutdown).await
    }

    /// Nothing here: [`Gate::close_idle`] does it when the drain says so.
    async fn cleanup(&self) {}
}
