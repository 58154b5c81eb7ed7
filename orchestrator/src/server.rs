//! `lightbyte server`: the API and the controllers of one control-plane instance.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::controllers::{
    self, ControllerConfig, LoadBalancers, Mover, ScaleGroups, Scheduler, WorkerHealth,
};
use crate::store::{Store, StoreError};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub etcd: Vec<String>,
    pub listen: SocketAddr,
    /// More addresses serving the same API (workers in other networks pulling images).
    pub also_listen: Vec<SocketAddr>,
    /// How long one etcd request may take before the API answers 503.
    pub etcd_timeout: Duration,
    pub controllers: ControllerConfig,
    /// Where pushed images are kept (none: this server keeps no images).
    pub image_dir: Option<std::path::PathBuf>,
    /// Whether images may name files on the workers by path.
    pub allow_host_path: bool,
    /// Connection cap, header deadline and allowed Host names of the API.
    pub limits: crate::serve::Limits,
    /// Who may call the API.
    pub auth: crate::auth::Auth,
    /// Mutual TLS (none: plain HTTP).
    pub tls: Option<crate::tls::TlsFiles>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(crate::tls::TlsError),
    #[error("image store {}: {source}", dir.display())]
    Images {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running control-plane instance. Dropping it aborts everything at once, like a crash (its
/// leaderships pass to a peer when their leases expire); [`ControlPlane::shutdown`] stops it
/// gracefully and hands its leaderships over at once.
pub struct ControlPlane {
    addr: SocketAddr,
    tls: bool,
    store: Store,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl ControlPlane {
    /// Listens, then serves the API and runs the controllers in the background. etcd need not
    /// be up: the API answers 503 and the controllers retry until it is.
    pub async fn start(config: ServerConfig) -> Result<ControlPlane, ServerError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let tls = match &config.tls {
            Some(files) => Some(files.server_config().map_err(ServerError::Tls)?),
            None => None,
        };
        let store = Store::connect(&config.etcd, config.etcd_timeout).await?;
        let handle = store.clone();
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();

        let blobs = match &config.image_dir {
            Some(dir) => Some(std::sync::Arc::new(
                crate::images::store::BlobStore::open(dir).map_err(|source| {
                    ServerError::Images {
                        dir: dir.clone(),
                        source,
                    }
                })?,
            )),
            None => None,
        };
        if config.allow_host_path {
            tracing::warn!(
                "--allow-host-path: images may name any file of the workers; trusted clients only"
            );
        }
        let app = crate::api::router(crate::api::Api {
            store: store.clone(),
            images: crate::api::Images {
                blobs,
                allow_host_path: config.allow_host_path,
            },
        });
        let app = crate::auth::guard(app, &config.auth, crate::auth::Surface::ControlPlane);
        let mut listeners = vec![listener];
        for addr in &config.also_listen {
            listeners.push(TcpListener::bind(addr).await.map_err(|source| {
                ServerError::Listen {
                    addr: *addr,
                    source,
                }
            })?);
        }
        for listener in listeners {
            tasks.spawn(crate::serve::serve(
                listener,
                app.clone(),
                config.limits.clone(),
                tls.clone(),
                shutdown.clone(),
            ));
        }
        tasks.spawn(controllers::run(
            Scheduler,
            store.clone(),
            config.controllers.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(controllers::run(
            WorkerHealth::default(),
            store.clone(),
            config.controllers.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(controllers::run(
            ScaleGroups::default(),
            store.clone(),
            config.controllers.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(controllers::run(
            Mover::default(),
            store.clone(),
            config.controllers.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(controllers::run(
            LoadBalancers::default(),
            store,
            config.controllers.clone(),
            shutdown.clone(),
        ));
        tracing::info!(%addr, holder = %config.controllers.holder, "control plane started");
        Ok(ControlPlane {
            addr,
            tls: config.tls.is_some(),
            store: handle,
            shutdown,
            tasks,
        })
    }

    /// Where the API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://ADDR`, or `http://ADDR` without TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The etcd traffic of this instance (API and controllers) so far.
    pub fn store_stats(&self) -> crate::store::StatsSnapshot {
        self.store.stats()
    }

    /// Stops serving, resigns leaderships and waits (up to `grace`) for everything to end.
    pub async fn shutdown(mut self, grace: Duration) {
        self.shutdown.cancel();
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("control plane did not stop within {grace:?}; aborting");
        }
    }
}
